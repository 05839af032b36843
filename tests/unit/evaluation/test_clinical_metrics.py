"""The metrics clinicians read (sensitivity, specificity, PPV, NPV, accuracy, confusion
counts, AUPRC): equal to scikit-learn's on a worked example, per fold and pooled."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from stagewise.evaluation.evidence import unit_evidence
from stagewise.evaluation.metrics import COUNTS, METRICS, binary_metrics, summarize
from stagewise.evaluation.statistics import bootstrap_ci, bootstrap_many

# A worked example: 10 patients, 4 with the outcome; threshold 0.5.
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
S = np.array([0.9, 0.8, 0.45, 0.6, 0.7, 0.2, 0.1, 0.3, 0.55, 0.05])
# decisions at 0.5: TP 3 (0.9, 0.8, 0.6), FN 1 (0.45), FP 2 (0.7, 0.55), TN 4


def test_rates_and_counts_equal_scikit_learn_on_a_worked_example():
    m = binary_metrics(Y, S, 0.5)
    pred = (S >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(Y, pred).ravel()
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn) == (3, 2, 4, 1)
    assert m["sensitivity"] == pytest.approx(recall_score(Y, pred)) == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(recall_score(Y, pred, pos_label=0)) == pytest.approx(4 / 6)
    assert m["ppv"] == pytest.approx(precision_score(Y, pred)) == pytest.approx(3 / 5)
    assert m["npv"] == pytest.approx(precision_score(Y, pred, pos_label=0)) == pytest.approx(4 / 5)
    assert m["accuracy"] == pytest.approx(accuracy_score(Y, pred)) == pytest.approx(7 / 10)
    assert m["auprc"] == pytest.approx(average_precision_score(Y, S))
    # average precision by hand: positives at ranks 1, 2, 4, 6 -> (1 + 1 + 3/4 + 4/6) / 4
    assert m["auprc"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 6) / 4)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y, pred))
    assert m["f1"] == pytest.approx(f1_score(Y, pred))
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, S))
    assert set(METRICS) | set(COUNTS) <= set(m)


@pytest.mark.parametrize("seed", range(6))
def test_every_decision_metric_equals_scikit_learns_on_random_cohorts(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    y = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(int)
    y[:2] = [0, 1]
    s = rng.random(n)
    t = float(rng.choice([0.0, 0.5, 0.9, 1.01]))  # includes "all positive" and "none positive"
    m, pred = binary_metrics(y, s, t), (s >= t).astype(int)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, pred, zero_division=0), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, zero_division=np.nan), abs=1e-12, nan_ok=True)
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0, zero_division=np.nan), abs=1e-12,
                                             nan_ok=True)
    assert m["ppv"] == pytest.approx(precision_score(y, pred, zero_division=np.nan), abs=1e-12, nan_ok=True)
    assert m["npv"] == pytest.approx(precision_score(y, pred, pos_label=0, zero_division=np.nan), abs=1e-12,
                                     nan_ok=True)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)


def test_undefined_rates_are_nan_not_zero():
    m = binary_metrics(Y, S, 0.99)  # no positive decision: PPV undefined
    assert np.isnan(m["ppv"]) and m["sensitivity"] == 0.0 and m["specificity"] == 1.0
    one_class = binary_metrics(np.zeros(4, int), np.array([0.1, 0.6, 0.2, 0.3]), 0.5)
    assert np.isnan(one_class["sensitivity"]) and np.isnan(one_class["auprc"])
    assert one_class["specificity"] == 0.75 and one_class["fp"] == 1


def test_fold_summary_gives_mean_and_sd_of_each_rate_and_count():
    folds = [binary_metrics(Y, S, t) for t in (0.4, 0.5, 0.65)]
    s = summarize(folds)
    for name in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "auprc", "tp", "fn"):
        values = [f[name] for f in folds]
        assert s[name]["mean"] == pytest.approx(np.mean(values)), name
        assert s[name]["sd"] == pytest.approx(np.std(values, ddof=1)), name
    assert summarize([{"auroc": 0.7}, {"auroc": 0.8}]).keys() == {"auroc"}  # folds of an older run


def test_pooled_evidence_counts_and_bootstrap_cis():
    """Pooled patients: counts of majority decisions, every rate with a patient-bootstrap CI
    from the same resamples as the AUROC's (and equal to bootstrap_ci's for each metric)."""
    rng = np.random.default_rng(0)
    n = 60
    y = (np.arange(n) % 3 == 0).astype(int)
    score = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
    decision = (score >= 0.5).astype(float)
    decision[:5] = 0.5  # a tie over repeats counts as positive
    table = pd.DataFrame({"patient": [f"p{i}" for i in range(n)], "y": y, "score": score, "decision": decision})
    ev = unit_evidence(table, "model", n_boot=150, seed=3)
    pred = (decision >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert ev["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    b = ev["bootstrap_ci"]
    assert set(b) == set(METRICS)
    assert b["sensitivity"]["point"] == pytest.approx(recall_score(y, pred))
    assert b["npv"]["point"] == pytest.approx(precision_score(y, pred, pos_label=0))
    assert b["auprc"]["point"] == pytest.approx(average_precision_score(y, score))
    for metric, fn_, values in (("auprc", average_precision_score, score),
                                ("specificity", lambda yy, dd: recall_score(yy, dd >= 0.5, pos_label=0), decision)):
        point, low, high = bootstrap_ci(y, values, table["patient"], fn_, n_boot=150, seed=3)
        assert (b[metric]["point"], b[metric]["low"], b[metric]["high"]) == pytest.approx((point, low, high))
        assert low < point < high


def test_bootstrap_many_resamples_patients_not_rows():
    y = np.array([1, 1, 0, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.4])
    patients = np.array(["a", "a", "b", "b", "c", "d"])
    out = bootstrap_many(y, s, patients, lambda yy, ss: {"n": float(len(yy))}, ["n"], n_boot=50, seed=0)
    assert out["n"]["point"] == 6.0
    assert 2.0 <= out["n"]["low"] <= out["n"]["high"] <= 8.0  # sums of whole patients' rows
