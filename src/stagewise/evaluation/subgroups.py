"""Performance per subgroup level (TRIPOD+AI: fairness): for each level of each subgroup column
(`cohort.subgroups`), the AUROC of the out-of-fold patient scores of the patients in it, with a
patient-bootstrap 95 % CI, its patients, events and images.

A level uses the scored images of that level, aggregated per patient as the protocol says
(`patient_level.patient_table` for a study, the same aggregate in `stagewise evaluate`): for a
column fixed per patient (sex, age band) that is the patient's score over all its images; for a
column that varies between a patient's images (the view), the score of its images of that view.
A level with fewer than MIN_CLASS patients with or without the outcome gets counts only: an
AUROC on a handful of events is noise that reads like a finding.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stagewise.evaluation.patient_level import patient_table
from stagewise.evaluation.statistics import auroc, bootstrap_ci

MIN_CLASS = 10
"""Fewest patients with, and without, the outcome for a level's AUROC to be estimated."""
PREFIX = "subgroup:"
"""Column prefix of the levels beside the predictions (no clash with their own columns)."""


def level_figures(y, scores, n_images: int, n_boot: int, seed: int) -> dict:
    """One level's counts and, with at least MIN_CLASS patients of each class, its AUROC with a
    patient-bootstrap 95 % CI (one row per patient; `n_boot` 0: the point only)."""
    y, s = np.asarray(y, dtype=int), np.asarray(scores, dtype=float)
    n_pos = int(y.sum())
    out = {"n_patients": int(len(y)), "n_positive": n_pos, "n_negative": int(len(y) - n_pos), "n_images": int(n_images),
           "estimable": bool(min(n_pos, len(y) - n_pos) >= MIN_CLASS)}
    if out["estimable"]:
        if n_boot:
            point, low, high = bootstrap_ci(y, s, np.arange(len(y)), auroc, n_boot=n_boot, seed=seed)
        else:
            point, low, high = auroc(y, s), None, None
        out["auroc"] = {"point": point, "low": low, "high": high}
    return out


def subgroup_evidence(predictions: pd.DataFrame, groups: pd.DataFrame, units: dict, names: list[str],
                      columns: dict, how: str, n_boot: int, seed: int) -> dict:
    """Per unit of `names`, per subgroup column (`columns`: column -> its levels in order),
    per level: `level_figures` of the unit's out-of-fold patient scores on the level's images.
    `groups` holds `row` (the manifest line, as the predictions do) and the level columns."""
    wanted = [c for c in columns if c in groups]
    levels = groups[["row", *wanted]].rename(columns={c: PREFIX + c for c in wanted})
    p = predictions.merge(levels, on="row", how="left")
    out: dict = {}
    for name in names:
        part = p[(p["arm"] == name) & p["prob"].notna()]
        out[name] = {}
        for c in wanted:
            out[name][c] = {}
            for level in columns[c]:
                rows = part[part[PREFIX + c] == level]
                table = (patient_table(rows, {name: units[name]}, how) if len(rows)
                         else pd.DataFrame({"y": [], "score": []}))
                out[name][c][level] = level_figures(table["y"], table["score"], rows["row"].nunique(), n_boot, seed)
    return out
