"""Fold metrics at a threshold chosen without the test part (evaluation/thresholds.py): AUROC, balanced accuracy and F1, and
what clinicians read: sensitivity, specificity, PPV, NPV, accuracy, the confusion counts
and the area under the precision-recall curve (AUPRC, as average precision)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

from stagewise.evaluation.thresholds import threshold_for

METRICS = ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "ppv", "npv", "accuracy", "auprc")
"""Rates, summarised over folds (mean, sd) and given pooled with bootstrap CIs."""
COUNTS = ("tp", "fp", "tn", "fn")
"""Confusion counts at the fold's threshold (patients)."""


def patient_scores(scores: np.ndarray, y: np.ndarray, patients: np.ndarray, how: str = "mean"):
    """One score and label per patient (image order decides `first`)."""
    df = pd.DataFrame({"p": patients, "s": scores, "y": y})
    agg = {"mean": "mean", "max": "max", "first": "first"}[how]
    grouped = df.groupby("p", sort=False)
    return grouped["s"].agg(agg).to_numpy(), grouped["y"].first().to_numpy()


def choose_threshold(y: np.ndarray, scores: np.ndarray, how) -> float:
    """The cut-off of the rule `how` (evaluation/thresholds.py: Youden's J, a target
    sensitivity or specificity, net benefit, the prevalence quantile, or a fixed value).

    Called on scores the test part never shaped: the training part's, or inner out-of-fold ones.
    """
    return threshold_for(y, scores, how)


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def decision_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, F1, sensitivity, specificity, PPV, NPV, accuracy and the counts of
    0/1 decisions, all from one scikit-learn confusion matrix: one library call instead of
    one per metric, which matters in the bootstrap's thousands of resamples. The formulas
    are scikit-learn's (balanced accuracy: mean recall of the two classes; F1: 2 TP / (2 TP +
    FP + FN), 0 when undefined); a rate whose denominator is empty (PPV with no positive
    decision) is NaN, not 0, and balanced accuracy needs both classes."""
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "balanced_accuracy": (sens + spec) / 2,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def binary_metrics(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Every metric of METRICS and COUNTS, deciding positive at scores >= threshold."""
    both = len(np.unique(y)) == 2
    return {
        "auroc": float(roc_auc_score(y, scores)) if both else float("nan"),
        "auprc": float(average_precision_score(y, scores)) if both else float("nan"),
        **decision_metrics(y, (scores >= threshold).astype(int)),
    }


def summarize(fold_metrics: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """mean, sd (ddof=1, as papers report over folds), min, max and count per metric and per
    confusion count; folds written before a metric existed are left out of its count."""
    out = {}
    for m in METRICS + COUNTS:
        if not any(m in f for f in fold_metrics):
            continue
        v = np.array([f.get(m, np.nan) for f in fold_metrics], dtype=float)
        v = v[np.isfinite(v)]
        out[m] = {
            "mean": float(v.mean()) if len(v) else float("nan"),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "min": float(v.min()) if len(v) else float("nan"),
            "max": float(v.max()) if len(v) else float("nan"),
            "n": int(len(v)),
        }
    return out


def patient_auroc(prob: np.ndarray, rows: np.ndarray, y: np.ndarray, patients: np.ndarray, how: str) -> float:
    """AUROC of `prob` (one per row of `rows`) over those rows' patients, each patient's image
    scores aggregated as the protocol says (`how`); NaN with one class only."""
    s, y_ = patient_scores(prob, y[rows], patients[rows], how)
    return binary_metrics(y_.astype(int), s, 0.5)["auroc"]
