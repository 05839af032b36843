"""In-study logistic recalibration, per fold: fitted on the fold's training part, applied to its test part.

CutMix and MixUp train on mixed soft labels, which pulls predictions towards the middle, and
no closed-form correction exists for that (unlike class-balanced sampling, `prior_shift.py`).
With `evaluation.recalibrate` set, each fold of a model unit fits

    logit P(y = 1) = a + b logit p

(`fit_recalibration`; `intercept` fixes b = 1, `slope` fits both) on the patient scores of its
own training part (aggregated as the protocol says, the scores its threshold is chosen on), and
maps the patient scores of its test part through it. The test patients take no part in the
fit. With b > 0 the map is increasing, so each fold's ranking, AUROC and decisions (at the
mapped threshold) stay as they were; a slope fit that comes out at b <= 0 falls back to the
intercept alone. Pooled over folds, whose maps differ, the patient ranking can move a little.
The training patients are those the network learnt from, so the fit corrects what moves every
prediction alike (mixing's shrinkage, a prevalence shift), not over-fitting, which only held-out
patients show (`stagewise evaluate --recalibrate` on an external cohort).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stagewise.evaluation.calibration import apply_recalibration, fit_recalibration


def fold_recalibration(y_train: np.ndarray, s_train: np.ndarray, method: str) -> dict:
    """The fold's recalibration fitted on its training patients' labels and scores: method,
    intercept a, slope b, and how many patients it was fitted on; `error` instead of a and b
    when the training part cannot support a fit (one class only)."""
    y, s = np.asarray(y_train).astype(int), np.asarray(s_train, dtype=float)
    out = {"method": method, "n_train_patients": int(len(y)), "n_train_positive": int(y.sum())}
    try:
        a, b = fit_recalibration(y, s, slope=method == "slope")
        if b <= 0:  # a decreasing map would reverse the ranking: keep the intercept only
            (a, b), out["fallback"] = fit_recalibration(y, s, slope=False), "the fitted slope was not positive"
    except ValueError as err:
        return out | {"error": str(err)}
    return out | {"intercept": a, "slope": b}


def recalibrated(unit: dict) -> bool:
    """Whether every fold of the unit (metrics.json's `arms[name]`) recorded a fitted recalibration."""
    folds = unit.get("folds") or []
    return bool(folds) and all("slope" in (f.get("recalibration") or {}) for f in folds)


def recalibrated_scores(per_fold: pd.DataFrame, units: dict) -> np.ndarray:
    """Per-fold patient scores (columns arm, repeat, fold, score) through their fold's recalibration."""
    fits = {(name, f["repeat"], f["fold"]): f["recalibration"] for name, u in units.items() for f in u["folds"]}
    keys = list(zip(per_fold["arm"], per_fold["repeat"], per_fold["fold"]))
    a = np.array([fits[k]["intercept"] for k in keys], dtype=float)
    b = np.array([fits[k]["slope"] for k in keys], dtype=float)
    return apply_recalibration(per_fold["score"].to_numpy(dtype=float), a, b)
