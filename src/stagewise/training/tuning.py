"""Nested cross-validation: a small grid searched inside each outer training fold.

The outer test fold never takes part in the choice, which is the weak point of studies that
pick hyperparameters on the folds they report (METHODS.md, BPD section).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import numpy as np

from stagewise.recipe import ArmConfig, TuneConfig


def grid_points(tune: TuneConfig) -> list[dict[str, Any]]:
    keys = list(tune.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(tune.grid[k] for k in keys))]


def choose_by_inner_cv(
    arm: ArmConfig,
    inner_splits: list,
    score: Callable[[ArmConfig, np.ndarray, np.ndarray], float],
) -> tuple[dict[str, Any], list[dict]]:
    """The grid point with the best mean inner-fold score, and every point's scores."""
    table = []
    for point in grid_points(arm.tune):
        candidate = arm.with_values(point)
        scores = [score(candidate, s.train, s.test) for s in inner_splits]
        table.append({"point": point, "scores": scores, "mean": float(np.nanmean(scores))})
    best = max(table, key=lambda r: r["mean"])
    return best["point"], table
