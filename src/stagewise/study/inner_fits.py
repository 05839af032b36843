"""The inner fits of one outer fold's training part: the nested-CV grid search of a tuned arm
(`training.tuning.choose_by_inner_cv`) and the inner out-of-fold scores a threshold rule with
`on: inner_cv` is chosen on. A tuned arm whose inner folds are as many as the rule's already
scored every training row out of fold with the chosen grid point: those scores are reused, no
extra fit is made. Kept apart from `fitting` so that the fitting module stays one job: it hands
in a `fit_predict` that trains a candidate arm on some rows and scores others.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from stagewise.evaluation.metrics import patient_auroc
from stagewise.evaluation.splits import SplitError, make_splits
from stagewise.evaluation.thresholds import inner_oof_scores
from stagewise.recipe import ArmConfig, ProtocolConfig, ThresholdRule
from stagewise.training.tuning import choose_by_inner_cv

log = logging.getLogger("stagewise")

FitPredict = Callable[[ArmConfig, np.ndarray, np.ndarray], np.ndarray]
"""(candidate arm, cohort rows to train on, cohort rows to score) -> scores, one column per outcome."""


@dataclass
class InnerFits:
    """What an outer fold's inner fits decided and scored."""

    arm: ArmConfig
    """The arm the outer fold trains: the chosen grid point of a tuned arm, else the arm itself."""
    tuning: dict | None = None
    """{chosen, grid}: the nested-CV search (tuned arms)."""
    p_inner: np.ndarray | None = None
    """Inner out-of-fold scores of the training rows (`on: inner_cv`), else None."""
    record: dict = field(default_factory=dict)
    """For the fold's json: inner folds, extra seconds, whether the tuning fits were reused, or why none ran."""


def wants_inner(rule: ThresholdRule | None) -> bool:
    """Whether `rule` chooses on inner out-of-fold scores (None: no threshold from these fits)."""
    return rule is not None and rule.on == "inner_cv" and not rule.fixed


def inner_fits(arm: ArmConfig, train: np.ndarray, y: np.ndarray, patients: np.ndarray, seed: int,
               rule: ThresholdRule | None, aggregate: str, fit_predict: FitPredict) -> InnerFits:
    """The tuned arm's grid search (inner AUROC at patient level, as before) and, when the rule
    chooses on inner out-of-fold scores, those scores of the `train` rows (cohort indices)."""
    out, reused = InnerFits(arm), None
    if arm.tune is not None:
        inner = make_splits(y[train], patients[train], ProtocolConfig(folds=arm.tune.inner_folds, repeats=1), seed)
        scored: list[np.ndarray] = []  # in choose_by_inner_cv's order: grid point by grid point, inner fold by fold

        def score(candidate: ArmConfig, inner_train: np.ndarray, inner_test: np.ndarray) -> float:
            rows = train[inner_test]
            p = np.asarray(fit_predict(candidate, train[inner_train], rows), dtype=float).reshape(len(rows), -1)
            scored.append(p)
            return patient_auroc(p[:, 0], rows, y, patients, aggregate)

        point, table = choose_by_inner_cv(arm, inner, score)
        out.arm, out.tuning = arm.with_values(point), {"chosen": point, "grid": table}
        if wants_inner(rule) and rule.folds == arm.tune.inner_folds:
            best = next(i for i, r in enumerate(table) if r["point"] == point)
            chosen = iter(scored[best * len(inner):(best + 1) * len(inner)])
            reused = inner_oof_scores(train, y, patients, rule.folds, seed, lambda a, b: next(chosen), inner=inner)
    if not wants_inner(rule):
        return out
    if reused is not None:
        out.p_inner, out.record = reused, {"folds": rule.folds, "seconds": 0.0, "reused_tuning_fits": True}
        return out
    t0 = time.perf_counter()
    try:
        out.p_inner = inner_oof_scores(train, y, patients, rule.folds, seed,
                                       lambda a, b: fit_predict(out.arm, a, b))
    except SplitError as err:  # too few patients of a class for the inner folds: say so, choose on training scores
        out.record = {"folds": rule.folds, "fallback": f"no inner folds ({err}); chosen on the training part's scores"}
        log.warning("threshold: %s", out.record["fallback"])
        return out
    out.record = {"folds": rule.folds, "seconds": time.perf_counter() - t0, "reused_tuning_fits": False}
    return out


def inner_scores_nonimage(train: np.ndarray, y: np.ndarray, patients: np.ndarray, seed: int, rule: ThresholdRule,
                          fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[np.ndarray | None, dict]:
    """A baseline's or the clinical model's inner out-of-fold scores (cheap: no network)."""
    if not wants_inner(rule):
        return None, {}
    try:
        return (inner_oof_scores(train, y, patients, rule.folds, seed, fit_predict),
                {"folds": rule.folds})
    except SplitError as err:
        return None, {"folds": rule.folds, "fallback": f"no inner folds ({err}); chosen on the training part's scores"}
