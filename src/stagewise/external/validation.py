"""The figures of an external validation, all computed by stagewise.evaluation.

On the external patients: the same evidence a study gives a unit (`unit_evidence`: AUROC with
DeLong and patient-bootstrap CIs, balanced accuracy and F1, the ROC band, calibration slope,
calibration-in-the-large, Brier, calibration and decision curves), plus the decision at the
bundle's stored threshold (sensitivity, specificity, PPV, NPV, with patient-bootstrap CIs);
per site, per subgroup and against the baselines in `groups`.
From the bundle: its cross-validated figures (fold mean ± sd from bundle.json, patient-level
CIs and out-of-fold probabilities from oof.json), so the two stand side by side. And the
logistic recalibration, fitted on one stated part of the external patients (whole patients,
stratified) and evaluated on the others, before and after, on the same held-out patients.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stagewise.evaluation.calibration import apply_recalibration, fit_recalibration
from stagewise.evaluation.evidence import unit_evidence
from stagewise.evaluation.metrics import binary_metrics
from stagewise.evaluation.splits import subsample_patients
from stagewise.external.options import EvaluateError


def at_threshold(y: np.ndarray, s: np.ndarray, threshold: float) -> dict:
    """Every metric of `binary_metrics` (sensitivity, specificity, PPV, NPV, ..., counts)
    for decisions at `threshold`, and how many patients it flags."""
    return {"threshold": float(threshold), **binary_metrics(y, s, threshold),
            "positive_decisions": int((s >= threshold).sum())}


def validation_figures(table: pd.DataFrame, threshold: float, n_boot: int, seed: int) -> dict:
    """Evidence on one set of patients (columns patient, y, score; one row per patient):
    `unit_evidence` with the decisions at `threshold` (its bootstrap CIs then cover
    sensitivity, specificity, ... at that threshold), the decision metrics themselves, and
    the mean predicted probability against the observed rate."""
    t = table.assign(decision=(table["score"].to_numpy() >= threshold).astype(float))
    y, s = t["y"].to_numpy(), t["score"].to_numpy()
    ev = unit_evidence(t, "model", n_boot, seed)
    ev["at_threshold"] = at_threshold(y, s, threshold)
    ev["mean_predicted"], ev["observed_rate"] = float(s.mean()), float(y.mean())
    return ev


def development_figures(task: dict, oof: dict | None, seed: int) -> dict:
    """The bundle's own cross-validated figures: fold mean ± sd (bundle.json), the run's
    patient-level CIs, and curves of its out-of-fold probabilities (oof.json; image level,
    once per repeat, so they carry no CIs of their own)."""
    out = {"cv": task.get("metrics", {}), "n_folds": task.get("n_folds")}
    if not oof:
        out["available"] = False
        return out
    out["available"] = True
    out["patient_level"] = oof.get("patient_level", {})
    prob, label = np.asarray(oof.get("probability", []), float), np.asarray(oof.get("label", []), int)
    out["n_oof"], out["n_oof_positive"] = int(len(prob)), int(label.sum())
    if len(np.unique(label)) == 2:
        t = pd.DataFrame({"patient": np.arange(len(prob)), "y": label, "score": prob,
                          "decision": (prob >= task["threshold"]).astype(float)})
        curves = unit_evidence(t, "model", 0, seed)
        out["roc"], out["calibration_curve"] = curves["roc"], curves["calibration_curve"]
        out["decision_curve"], out["calibration"] = curves["decision_curve"], curves["calibration"]
        out["auroc_oof_images"] = curves["auroc_delong_ci"]["point"]
        out["auroc_delong_ci"] = {"point": out["auroc_oof_images"]}  # the point only: images are not independent
        out["mean_predicted"], out["observed_rate"] = float(prob.mean()), float(label.mean())
    return out


def recalibration(table: pd.DataFrame, method: str, fraction: float, threshold: float, n_boot: int,
                  seed: int) -> tuple[dict, np.ndarray]:
    """Fit the logistic recalibration on a stratified `fraction` of the patients (whole
    patients), evaluate the original and the recalibrated scores on the other patients.
    Returns the record and, per patient row, True where it was in the fitting part."""
    y, s, patients = table["y"].to_numpy(), table["score"].to_numpy(), table["patient"].to_numpy()
    rows = np.arange(len(table))
    fit = np.isin(rows, subsample_patients(rows, y, patients, fraction, seed))
    problems = []
    for name, part in (("fitted on", fit), ("held out", ~fit)):
        counts = np.bincount(y[part], minlength=2)
        if counts.min() < 2:
            problems.append(f"the recalibration's {name} part has {counts[1]} positive and {counts[0]} negative "
                            f"patients; each needs at least 2 of both: change --fit-fraction ({fraction}) or "
                            "evaluate without --recalibrate")
    if problems:
        raise EvaluateError(problems)
    a, b = fit_recalibration(y[fit], s[fit], slope=method == "slope")
    if not b > 0:
        raise EvaluateError([f"the fitted recalibration slope is {b:.3f}: on these patients the model ranks the wrong "
                             "way round, which recalibration cannot repair; do not use this bundle here"])
    held = table[~fit]
    new_threshold = float(apply_recalibration(threshold, a, b))
    record = {
        "method": method, "intercept": a, "slope": b, "fit_fraction": fraction, "seed": seed,
        "fitted_on": {"n_patients": int(fit.sum()), "n_positive": int(y[fit].sum())},
        "held_out": {"n_patients": int((~fit).sum()), "n_positive": int(y[~fit].sum())},
        "threshold": new_threshold,
        "before": validation_figures(held, threshold, n_boot, seed),
        "after": validation_figures(held.assign(score=apply_recalibration(held["score"], a, b)), new_threshold,
                                    n_boot, seed),
    }
    return record, fit


COMPARED = ("auroc", "auprc", "balanced_accuracy", "f1", "sensitivity", "specificity", "ppv", "npv")
CALIBRATION = (("brier", "brier"), ("calibration_slope", "slope"), ("calibration_intercept", "intercept"))


def _row(metric: str, cv, pooled, external: dict, reference, kind: str | None) -> dict:
    point = external.get("point")
    diff = point - reference if point is not None and reference is not None else None
    return {"metric": metric, "development_cv": cv, "development_pooled": pooled, "external": external,
            "reference": reference, "reference_kind": kind, "difference": diff}


def comparison(external: dict, development: dict) -> list[dict]:
    """Per metric: the development figures (fold mean ± sd; pooled patients with CI), the
    external point and CI, and the difference external − development. The reference is the
    pooled patient-level figure where the bundle has it, else the fold mean; for calibration
    it is the out-of-fold images (the only development calibration a bundle holds)."""
    cv = development.get("cv") or {}
    pooled = (development.get("patient_level") or {}).get("bootstrap_ci") or {}
    rows = []
    for m in COMPARED:
        ext = (external.get("bootstrap_ci") or {}).get(m) or {"point": external.get("at_threshold", {}).get(m)}
        if (pooled.get(m) or {}).get("point") is not None:
            ref, kind = pooled[m]["point"], "pooled patients"
        elif (cv.get(m) or {}).get("mean") is not None:
            ref, kind = cv[m]["mean"], "fold mean"
        else:
            ref, kind = None, None
        rows.append(_row(m, cv.get(m), pooled.get(m), ext, ref, kind))
    dev_cal, ext_cal = development.get("calibration") or {}, external.get("calibration") or {}
    for m, key in CALIBRATION:
        ext = {"point": ext_cal.get(key), "low": ext_cal.get(f"{key}_low"), "high": ext_cal.get(f"{key}_high")}
        ref = dev_cal.get(key)
        rows.append(_row(m, None, None, ext, ref, "out-of-fold images" if ref is not None else None))
    return rows
