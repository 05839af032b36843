"""Scoring one fold: the decision threshold from the training part, patient-level metrics
on the test part (overall, per extra outcome and per site), the in-study recalibration fitted
on the training part when the recipe asks for it, and the fold's prediction table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stagewise.data import Cohort
from stagewise.evaluation.metrics import binary_metrics, choose_threshold, patient_scores
from stagewise.evaluation.recalibration import fold_recalibration
from stagewise.evaluation.splits import Split
from stagewise.recipe import Recipe


def _task_metrics(recipe: Recipe, y: np.ndarray, patients: np.ndarray, train: np.ndarray, test: np.ndarray,
                  p_train: np.ndarray, p_test: np.ndarray) -> dict:
    """Threshold from training-part scores; metrics on the test part at patient level.

    Rows without a score (a baseline value not recorded) or without a label (a secondary
    outcome not known) are left out.
    """
    how = recipe.protocol.patient_aggregate
    ok_train = ~np.isnan(p_train) & ~np.isnan(y[train])
    ok_test = ~np.isnan(p_test) & ~np.isnan(y[test])
    s_train, y_train = patient_scores(p_train[ok_train], y[train][ok_train], patients[train][ok_train], how)
    threshold = choose_threshold(y_train.astype(int), s_train, recipe.protocol.threshold)
    s_test, y_test = patient_scores(p_test[ok_test], y[test][ok_test], patients[test][ok_test], how)
    metrics = binary_metrics(y_test.astype(int), s_test, threshold)
    metrics["threshold"] = threshold
    metrics["train_auroc"] = binary_metrics(y_train.astype(int), s_train, threshold)["auroc"]
    metrics["n_test_patients"] = int(len(s_test))
    metrics["n_train_patients"] = int(len(s_train))
    # what a class-balanced sampler reweighted away: the prior-shift correction needs it (evaluation/prior_shift.py)
    metrics["train_prevalence_images"] = float(np.mean(y[train][ok_train])) if ok_train.any() else float("nan")
    return metrics


def score_fold(recipe: Recipe, cohort: Cohort, split: Split, train: np.ndarray,
               p_train: np.ndarray, p_test: np.ndarray, recalibrate: bool = False) -> tuple[dict, pd.DataFrame]:
    """Metrics of the primary outcome (top level) and of each extra outcome (`tasks`), and
    the test predictions. `p_train`/`p_test` have one column per outcome the unit predicts.
    `recalibrate` (model units, whose scores are probabilities): with `evaluation.recalibrate`
    set, `recalibration` holds the primary outcome's logistic recalibration fitted on the
    training rows' patient scores (evaluation/recalibration.py); the test predictions stay raw."""
    t = cohort.table
    patients, test = t["patient"].to_numpy(), split.test
    labels = cohort.targets()
    p_train, p_test = p_train.reshape(len(train), -1), p_test.reshape(len(test), -1)
    metrics = _task_metrics(recipe, labels[:, 0], patients, train, test, p_train[:, 0], p_test[:, 0])
    threshold = metrics["threshold"]
    if recalibrate and recipe.evaluation.recalibrate != "none":
        ok = ~np.isnan(p_train[:, 0]) & ~np.isnan(labels[train, 0])
        s_train, y_train = patient_scores(p_train[ok, 0], labels[train, 0][ok], patients[train][ok],
                                          recipe.protocol.patient_aggregate)
        metrics["recalibration"] = fold_recalibration(y_train, s_train, recipe.evaluation.recalibrate)
    preds = pd.DataFrame({
        "repeat": split.repeat,
        "fold": split.fold,
        "row": t["row"].to_numpy()[test],
        "image": t["path"].to_numpy()[test],
        "patient": patients[test],
        "y": t["y"].to_numpy()[test],
        "prob": p_test[:, 0].astype(np.float64),
        "pred": np.where(~np.isnan(p_test[:, 0]), (p_test[:, 0] >= threshold).astype(float), np.nan),
    })
    if "site" in t:  # per-site figures on the same patients, for every unit
        site = t["site"].astype(str).to_numpy()
        preds["site"] = site[test]
        metrics["sites"] = _site_metrics(recipe, site[test], labels[test, 0], patients[test], p_test[:, 0], threshold)
    if p_test.shape[1] > 1:
        metrics["tasks"] = {}
        for j, task in enumerate(cohort.tasks[1:], start=1):
            metrics["tasks"][task] = _task_metrics(recipe, labels[:, j], patients, train, test, p_train[:, j], p_test[:, j])
            preds[f"y:{task}"] = labels[test, j]
            preds[f"prob:{task}"] = p_test[:, j].astype(np.float64)
    return metrics, preds


def _site_metrics(recipe: Recipe, site: np.ndarray, y: np.ndarray, patients: np.ndarray, p: np.ndarray,
                  threshold: float) -> dict:
    out = {}
    for s in dict.fromkeys(site):
        ok = (site == s) & ~np.isnan(p) & ~np.isnan(y)
        sc, yy = patient_scores(p[ok], y[ok], patients[ok], recipe.protocol.patient_aggregate)
        out[s] = binary_metrics(yy.astype(int), sc, threshold) | {"n_test_patients": int(len(sc))}
    return out
