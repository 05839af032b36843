"""Subgroup performance from out-of-fold scores, the smoothed calibration curve and the bootstrap
bands of the calibration and decision curves."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from stagewise.evaluation.calibration import curve_bands, decision_curve, net_benefit, smoothed_calibration
from stagewise.evaluation.evidence import calibration_evidence
from stagewise.evaluation.statistics import auroc, bootstrap_curve
from stagewise.evaluation.subgroups import MIN_CLASS, level_figures, subgroup_evidence


def _study(n_patients: int = 80, seed: int = 0):
    """Out-of-fold predictions of one unit: 2 repeats x 2 folds, two images per patient (AP, PA),
    the patient's sex fixed, and the levels of each manifest row."""
    rng = np.random.default_rng(seed)
    rows, levels = [], []
    for p in range(n_patients):
        y = int(p % 2)
        sex = "F" if p % 3 else "M"
        for k, view in enumerate(("AP", "PA")):
            row = 2 + 2 * p + k
            levels.append({"row": row, "sex": sex, "view": view})
            for repeat in range(2):
                rows.append({"arm": "a", "repeat": repeat, "fold": (p + repeat) % 2, "row": row, "patient": f"p{p}",
                             "y": y, "prob": float(np.clip(0.3 * y + 0.35 + rng.normal(0, 0.2), 0, 1))})
    preds = pd.DataFrame(rows)
    units = {"a": {"kind": "model", "folds": [{"repeat": r, "fold": f, "threshold": 0.5} for r in range(2) for f in range(2)]}}
    return preds, pd.DataFrame(levels), units


def _expected_auroc(preds: pd.DataFrame) -> tuple[float, int]:
    """Independently: mean of a patient's image scores per fold, then the mean over repeats."""
    per_fold = preds.groupby(["repeat", "fold", "patient"]).agg(y=("y", "first"), s=("prob", "mean")).reset_index()
    per_patient = per_fold.groupby("patient").agg(y=("y", "first"), s=("s", "mean"))
    return roc_auc_score(per_patient["y"], per_patient["s"]), len(per_patient)


def test_subgroup_auroc_equals_roc_auc_score_on_that_subgroups_patients():
    preds, groups, units = _study()
    out = subgroup_evidence(preds, groups, units, ["a"], {"sex": ["F", "M"], "view": ["AP", "PA"]}, "mean", 200, 0)
    merged = preds.merge(groups, on="row")
    for column, level in (("sex", "F"), ("sex", "M"), ("view", "AP"), ("view", "PA")):
        got = out["a"][column][level]
        want, n = _expected_auroc(merged[merged[column] == level])
        assert got["estimable"] and got["auroc"]["point"] == pytest.approx(want, abs=1e-12)
        assert got["n_patients"] == n
        assert got["auroc"]["low"] <= got["auroc"]["point"] <= got["auroc"]["high"]
    # a column fixed per patient: its levels split the patients; a view: every patient in both
    assert out["a"]["sex"]["F"]["n_patients"] + out["a"]["sex"]["M"]["n_patients"] == 80
    assert out["a"]["view"]["AP"]["n_patients"] == out["a"]["view"]["PA"]["n_patients"] == 80
    assert out["a"]["view"]["AP"]["n_images"] == 80


def test_a_level_with_too_few_events_gets_counts_and_no_figure():
    y = np.array([1] * (MIN_CLASS - 1) + [0] * 30)
    got = level_figures(y, np.linspace(0, 1, len(y)), 50, 100, 0)
    assert got == {"n_patients": 39, "n_positive": MIN_CLASS - 1, "n_negative": 30, "n_images": 50, "estimable": False}


def test_fast_auroc_equals_roc_auc_score_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # rounded: many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_net_benefit_equals_dcurves():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 150)
    p = np.clip(0.5 * y + rng.uniform(0, 0.5, 150), 0, 1)
    t = np.round(np.arange(0.02, 0.81, 0.02), 2)
    assert net_benefit(y, p, t) == pytest.approx(decision_curve(y, p, t)["net_benefit_model"].to_numpy(), abs=1e-12)


def test_smooth_of_calibrated_predictions_follows_the_diagonal():
    rng = np.random.default_rng(3)
    p = rng.uniform(0.05, 0.95, 4000)
    y = (rng.uniform(size=4000) < p).astype(int)
    grid = np.linspace(0.2, 0.8, 7)
    assert smoothed_calibration(y, p, grid) == pytest.approx(grid, abs=0.05)
    assert np.isnan(smoothed_calibration(y, p, [0.0, 0.99])).all()  # outside the predictions' range: no curve


def test_the_bands_contain_the_curves_and_repeat_with_the_seed():
    rng = np.random.default_rng(4)
    p = rng.uniform(0.05, 0.95, 120)
    y = (rng.uniform(size=120) < p).astype(int)
    ev = calibration_evidence(y, p, 200, 0)
    smooth = ev["calibration_curve"]["smooth"]
    inside = [(lo, v, hi) for lo, v, hi in zip(smooth["low"], smooth["observed"], smooth["high"]) if None not in (lo, v, hi)]
    assert len(inside) > 30 and all(lo <= v <= hi for lo, v, hi in inside)
    d = ev["decision_curve"]
    assert all(lo <= v <= hi for lo, v, hi in zip(d["net_benefit_model_low"], d["net_benefit_model"],
                                                  d["net_benefit_model_high"]))
    assert d["band_resamples"] == ev["calibration_curve"]["band_resamples"] == 200
    assert calibration_evidence(y, p, 200, 0) == ev
    no_band = calibration_evidence(y, p)
    assert "low" not in no_band["calibration_curve"]["smooth"] and "net_benefit_model_low" not in no_band["decision_curve"]


def test_bootstrap_curve_resamples_patients_and_skips_one_class_draws():
    y = np.array([0, 1, 0, 1])
    s = np.array([0.1, 0.9, 0.2, 0.8])
    low, high = bootstrap_curve(y, s, np.array([0, 0, 1, 1]), lambda yy, ss: np.array([yy.mean()]), 50, 0)
    assert low[0] == high[0] == 0.5  # each patient holds one of each class: every resample's mean is 0.5
    assert curve_bands(y, s, [0.5], 0, 0).keys() == {"smooth"}
