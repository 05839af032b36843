"""`oof.json`, a bundle's validation record: the cross-validated out-of-fold scores of the
study that made it (per image and per patient, sorted, no ids), the routine-score baselines'
orientation, and the figures of the bundle's own decision rule at its threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from stagewise.evaluation.metrics import COUNTS, binary_metrics
from stagewise.evaluation.statistics import bootstrap_metrics

VALIDATION_FILE = "oof.json"


def write_validation(folder: Path, run_dir: Path, metrics: dict, tasks: list[dict], how: str) -> dict | None:
    """`oof.json`: what each output was validated with, so that a new probability can be
    placed against it (the bedside page): per output, the arm's cross-validated out-of-fold
    probabilities and labels, one per scored image and repeat, sorted by probability; the
    patient-level CIs of the run's evidence; per output, the patient-level out-of-fold scores
    (`patients`: each patient's images aggregated as the protocol says in each fold, then the
    mean over repeats; sorted) that the figures at the bundle's threshold are computed from;
    the cohort's counts and the protocol. It holds no image names, patient ids or paths, and
    no row order that could tie a value to a row. Returns its `outputs`."""
    path = run_dir / "predictions.csv"
    if not path.is_file():
        return None
    evidence = metrics.get("evidence", {}).get("units", {})
    columns = {"arm", "repeat", "fold", "patient"} | {c for t in tasks for c in _oof_columns(t)}
    preds = pd.read_csv(path, usecols=lambda c: c in columns)
    outputs = {}
    for t in tasks:
        prob_col, y_col = _oof_columns(t)
        if prob_col not in preds or y_col not in preds:
            continue
        part = preds.loc[preds["arm"] == t["arm"], ["repeat", "fold", "patient", prob_col, y_col]].dropna()
        pairs = sorted(zip(part[prob_col].astype(float).round(6).tolist(), part[y_col].astype(int).tolist()))
        unit = evidence.get(t["arm"], {})
        ev = unit if t["output"] == t["arm"] else unit.get("tasks", {}).get(t["outcome"], {})
        outputs[t["output"]] = {
            "arm": t["arm"], "outcome": t["outcome"], "n": len(pairs), "n_positive": int(sum(y for _, y in pairs)),
            "probability": [p for p, _ in pairs], "label": [y for _, y in pairs],
            "patient_level": {k: ev[k] for k in ("n_patients", "n_positive", "auroc_delong_ci", "bootstrap_ci") if k in ev},
            "patients": _patient_oof(part, prob_col, y_col, how),
        }
    info = {
        "about": "cross-validated out-of-fold probabilities (each image scored by a model that did not train on its "
                 "patient; once per repeat) and patient-level 95 % CIs of the study that made this bundle",
        "cohort": metrics.get("cohort", {}), "protocol": metrics.get("protocol", {}),
        "ci_settings": metrics.get("evidence", {}).get("settings", {}), "outputs": outputs,
        "baselines": baseline_record(metrics),
    }
    (folder / VALIDATION_FILE).write_text(json.dumps(info))
    return outputs


def baseline_record(metrics: dict) -> dict:
    """Per routine-score baseline of the run: its orientation (+1: higher values mean the
    outcome, -1: lower; the majority of its folds', each chosen on training data) and its
    patient-level AUROC, so that `stagewise evaluate` scores it alike on an external cohort."""
    out = {}
    evidence = metrics.get("evidence", {}).get("units", {})
    for name, unit in metrics.get("arms", {}).items():
        if unit.get("kind") != "baseline" or not unit.get("column"):
            continue
        signs = [d for d in unit.get("directions") or [] if d in (1, -1)]
        ev = evidence.get(name, {})
        out[unit["column"]] = {"direction": (1 if sum(signs) >= 0 else -1) if signs else None,
                               **{k: ev[k] for k in ("n_patients", "n_positive", "auroc_delong_ci") if k in ev}}
    return out


def _patient_oof(part: pd.DataFrame, prob_col: str, y_col: str, how: str) -> dict:
    """One out-of-fold score per patient (its images aggregated by `how` within each fold, the
    mean over repeats) and its label, sorted by score: what a patient-level figure of the
    cross-validated models at one threshold needs, and no patient id."""
    agg = {"mean": "mean", "max": "max", "first": "first"}[how]
    per_fold = part.groupby(["repeat", "fold", "patient"], sort=False).agg(y=(y_col, "first"), score=(prob_col, agg))
    table = per_fold.groupby("patient", sort=False).agg(y=("y", "first"), score=("score", "mean"))
    pairs = sorted(zip(table["score"].astype(float).round(6).tolist(), table["y"].astype(int).tolist()))
    return {"n": len(pairs), "n_positive": int(sum(y for _, y in pairs)),
            "score": [p for p, _ in pairs], "label": [y for _, y in pairs]}


AT_THRESHOLD = ("sensitivity", "specificity", "ppv", "npv", "balanced_accuracy")
"""The figures of a bundle's own decision rule (its threshold on the cross-validated scores)."""


def threshold_figures(patients: dict, threshold: float, n_boot: int, seed: int) -> dict:
    """Sensitivity, specificity, PPV, NPV and balanced accuracy of the patient-level
    out-of-fold scores (`_patient_oof`) decided at `threshold`, each with a patient bootstrap
    95 % CI (`n_boot` resamples, 0: the point only), and the confusion counts."""
    y, s = np.asarray(patients["label"], dtype=int), np.asarray(patients["score"], dtype=float)
    point = binary_metrics(y, s, threshold)
    ids = np.arange(len(y))  # one row per patient: resampling rows resamples patients
    ci = bootstrap_metrics(y, s, ids, threshold, n_boot=n_boot, seed=seed) if n_boot and len(np.unique(y)) == 2 else {}
    ci = {m: {k: _finite(v) for k, v in ci[m].items()} for m in ci}
    return {
        "threshold": float(threshold), "n_patients": int(len(y)), "n_positive": int(y.sum()),
        "bootstrap_resamples": int(n_boot) if ci else 0, "level": 0.95,
        "about": "the cross-validated models' out-of-fold scores (one per patient) decided at this bundle's threshold",
        **{m: ci.get(m, {"point": _finite(point[m]), "low": None, "high": None}) for m in AT_THRESHOLD},
        "counts": {c: int(point[c]) for c in COUNTS},
    }


def _finite(x) -> float | None:
    """A figure for bundle.json: None where undefined (PPV with no positive decision)."""
    return float(x) if x is not None and np.isfinite(x) else None


def _oof_columns(task: dict) -> tuple[str, str]:
    """predictions.csv columns of a bundle output: (probability, label)."""
    return ("prob", "y") if task["output"] == task["arm"] else (f"prob:{task['outcome']}", f"y:{task['outcome']}")
