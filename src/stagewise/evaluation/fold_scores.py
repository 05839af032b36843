"""Scoring one fold: the decision threshold by the protocol's rule (on the training part's
scores or on its inner out-of-fold scores), patient-level metrics
on the test part (overall, per extra outcome and per site), the in-study recalibration fitted
on the training part when the recipe asks for it, and the fold's prediction table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stagewise.data import Cohort
from stagewise.evaluation.metrics import binary_metrics, choose_threshold, patient_scores
from stagewise.evaluation.recalibration import fold_recalibration
from stagewise.evaluation.splits import Split
from stagewise.evaluation.thresholds import threshold_unreliable
from stagewise.recipe import Recipe


def _task_metrics(recipe: Recipe, y: np.ndarray, patients: np.ndarray, train: np.ndarray, test: np.ndarray,
                  p_train: np.ndarray, p_test: np.ndarray, p_inner: np.ndarray | None = None) -> dict:
    """Threshold by the protocol's rule, on the inner out-of-fold scores of the training rows
    (`p_inner`, when the rule is `on: inner_cv` and they were made) or else on the training
    rows' own scores; metrics on the test part at patient level. Records the threshold, the
    rule, where it was chosen and the training AUROC (and whether the threshold is unreliable).

    Rows without a score (a baseline value not recorded) or without a label (a secondary
    outcome not known) are left out.
    """
    how, rule = recipe.protocol.patient_aggregate, recipe.protocol.threshold
    ok_train = ~np.isnan(p_train) & ~np.isnan(y[train])
    ok_test = ~np.isnan(p_test) & ~np.isnan(y[test])
    s_train, y_train = patient_scores(p_train[ok_train], y[train][ok_train], patients[train][ok_train], how)
    inner = rule.on == "inner_cv" and not rule.fixed and p_inner is not None
    if inner:
        ok = ~np.isnan(p_inner) & ~np.isnan(y[train])
        s_choose, y_choose = patient_scores(p_inner[ok], y[train][ok], patients[train][ok], how)
    else:
        s_choose, y_choose = s_train, y_train
    threshold = choose_threshold(y_choose.astype(int), s_choose, rule)
    s_test, y_test = patient_scores(p_test[ok_test], y[test][ok_test], patients[test][ok_test], how)
    metrics = binary_metrics(y_test.astype(int), s_test, threshold)
    metrics["threshold"] = threshold
    metrics["train_auroc"] = binary_metrics(y_train.astype(int), s_train, threshold)["auroc"]
    metrics["threshold_rule"] = rule.describe()
    metrics["threshold_on"] = "fixed" if rule.fixed else "inner_cv" if inner else "training"
    if inner:
        metrics["inner_auroc"] = binary_metrics(y_choose.astype(int), s_choose, threshold)["auroc"]
    metrics["threshold_unreliable"] = (not rule.fixed and not inner
                                       and threshold_unreliable(rule.model_copy(update={"on": "training"}),
                                                                metrics["train_auroc"]))
    metrics["n_test_patients"] = int(len(s_test))
    metrics["n_train_patients"] = int(len(s_train))
    # what a class-balanced sampler reweighted away: the prior-shift correction needs it (evaluation/prior_shift.py)
    metrics["train_prevalence_images"] = float(np.mean(y[train][ok_train])) if ok_train.any() else float("nan")
    return metrics


def score_fold(recipe: Recipe, cohort: Cohort, split: Split, train: np.ndarray,
               p_train: np.ndarray, p_test: np.ndarray, recalibrate: bool = False,
               p_inner: np.ndarray | None = None, model: str | None = None) -> tuple[dict, pd.DataFrame]:
    """Metrics of the primary outcome (top level) and of each extra outcome (`tasks`), and
    the test predictions. `p_train`/`p_test` have one column per outcome the unit predicts;
    `p_inner`, the same columns, the training rows' inner out-of-fold scores (`on: inner_cv`).
    `recalibrate` (model units, whose scores are probabilities): with `evaluation.recalibrate`
    set, `recalibration` holds the primary outcome's logistic recalibration fitted on the
    training rows' patient scores (evaluation/recalibration.py); the test predictions stay raw.
    `model`, a model unit's name: its scores are never missing, so one that is not finite means
    training diverged, and the fold stops saying so (else the rows would be dropped as missing
    and the fold scored on nothing)."""
    t = cohort.table
    patients, test = t["patient"].to_numpy(), split.test
    labels = cohort.targets()
    p_train, p_test = p_train.reshape(len(train), -1), p_test.reshape(len(test), -1)
    p_inner = None if p_inner is None else p_inner.reshape(len(train), -1)
    if model is not None and not (np.isfinite(p_train).all() and np.isfinite(p_test).all()):
        bad = int((~np.isfinite(p_train)).sum() + (~np.isfinite(p_test)).sum())
        raise FloatingPointError(
            f"{model} {split.name}: {bad} of {p_train.size + p_test.size} scores are not finite (NaN or infinite): "
            "training diverged. Lower the stages' lr, or for a federated arm the server's step "
            "(sites.strategy_params: server_learning_rate, server_momentum, eta)")
    metrics = _task_metrics(recipe, labels[:, 0], patients, train, test, p_train[:, 0], p_test[:, 0],
                            None if p_inner is None else p_inner[:, 0])
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
            metrics["tasks"][task] = _task_metrics(recipe, labels[:, j], patients, train, test, p_train[:, j],
                                                   p_test[:, j], None if p_inner is None else p_inner[:, j])
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
