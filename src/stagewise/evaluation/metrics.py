"""Fold metrics: AUROC, balanced accuracy and F1 at a threshold chosen on training data."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score, roc_curve

METRICS = ("auroc", "balanced_accuracy", "f1")


def patient_scores(scores: np.ndarray, y: np.ndarray, patients: np.ndarray, how: str = "mean"):
    """One score and label per patient (image order decides `first`)."""
    df = pd.DataFrame({"p": patients, "s": scores, "y": y})
    agg = {"mean": "mean", "max": "max", "first": "first"}[how]
    grouped = df.groupby("p", sort=False)
    return grouped["s"].agg(agg).to_numpy(), grouped["y"].first().to_numpy()


def choose_threshold(y: np.ndarray, scores: np.ndarray, how) -> float:
    """Youden's J (max sensitivity + specificity - 1), the prevalence quantile, or a fixed value.

    Called on training-part predictions only, so that the test part never shapes its own cut-off.
    """
    if isinstance(how, (int, float)):
        return float(how)
    if len(np.unique(y)) < 2:
        return 0.5
    if how == "prevalence":
        return float(np.quantile(scores, 1 - np.mean(y)))
    fpr, tpr, thr = roc_curve(y, scores)
    best = np.argmax(tpr - fpr)
    return float(min(thr[best], 1.0))


def binary_metrics(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    pred = (scores >= threshold).astype(int)
    both = len(np.unique(y)) == 2
    return {
        "auroc": float(roc_auc_score(y, scores)) if both else float("nan"),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if both else float("nan"),
        "f1": float(f1_score(y, pred, zero_division=0)),
    }


def summarize(fold_metrics: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """mean, sd (ddof=1, as papers report over folds), min, max and count per metric."""
    out = {}
    for m in METRICS:
        v = np.array([f[m] for f in fold_metrics], dtype=float)
        v = v[np.isfinite(v)]
        out[m] = {
            "mean": float(v.mean()) if len(v) else float("nan"),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "min": float(v.min()) if len(v) else float("nan"),
            "max": float(v.max()) if len(v) else float("nan"),
            "n": int(len(v)),
        }
    return out
