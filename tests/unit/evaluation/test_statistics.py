"""Tests for stagewise.evaluation.statistics and stagewise.evaluation.calibration.

Published worked examples used as references:

- DeLong (paired and single-curve): pROC's aSAH data (Turck et al. 2010, Intensive Care Med
  36:107; shipped with R pROC, Robin et al. 2011, BMC Bioinformatics 12:77). Values of outcome,
  wfns, s100b and ndka below are copied in row order from the Rdatasets CSV of that table,
  github.com/vincentarelbundock/Rdatasets csv/NeuroDataSets/SAHemorrhage_df.csv (commit
  61919a0b; "original content has not been modified"; 113 patients, 41 Poor / 72 Good).
  Expected numbers: pROC's documented roc.test(s100b, wfns) output (AUCs 0.7314 and 0.8237,
  Z = -2.209, p-value = 0.02718) and the full-precision values asserted in pROC's own test
  suite, github.com/xrobin/pROC tests/testthat/test-roc.test.R, test-ci.auc.R and test-var.R.
- Corrected resampled t-test: scikit-learn's gallery example "Statistical comparison of models
  using grid search" (examples/model_selection/plot_grid_search_stats.py; rendered output in
  github.com/scikit-learn/scikit-learn.github.io dev/_sources/auto_examples/model_selection/
  plot_grid_search_stats.rst.txt): rbf vs linear SVC, 10 x 10-fold CV on make_moons,
  "Corrected t-value: 0.750", "Corrected p-value: 0.227" (one-sided), 95 % interval of the
  mean difference -0.016445 to 0.036445, and the pairwise t table (1.657, 4.565, 1.111, 4.276,
  3.851). The test regenerates the fold scores with the example's exact code path.
"""

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from stagewise.evaluation.calibration import (
    brier_score,
    calibration_curve,
    calibration_slope_intercept,
    decision_curve,
)
from stagewise.evaluation.metrics import METRICS, binary_metrics
from stagewise.evaluation.statistics import (
    bootstrap_ci,
    bootstrap_metrics,
    corrected_resampled_ttest,
    delong_ci,
    delong_test,
    wilcoxon_test,
)

# --- pROC aSAH (see module docstring for the source); outcome 1 = Poor -----------------------
ASAH_POOR = np.array(
    [int(c) for c in "0000110100101100101110100000000010011011000000000110001000101001"
     "1101101111000110100000010000000000001111110001000"]
)
ASAH_S100B = np.array([
    0.13, 0.14, 0.1, 0.04, 0.13, 0.1, 0.47, 0.16, 0.18, 0.1, 0.12, 0.1, 0.44, 0.71, 0.04, 0.08,
    0.49, 0.04, 0.07, 0.33, 0.09, 0.09, 0.07, 0.11, 0.07, 0.17, 0.07, 0.11, 0.13, 0.19, 0.05, 0.16,
    0.41, 0.14, 0.34, 0.35, 0.48, 0.09, 0.96, 0.25, 0.5, 0.46, 0.16, 0.07, 0.43, 0.45, 0.11, 0.08,
    0.09, 0.86, 0.52, 0.08, 0.06, 0.13, 2.07, 0.1, 0.14, 0.15, 0.07, 0.06, 0.77, 0.05, 0.09, 0.3,
    0.03, 0.09, 0.04, 0.23, 0.7, 0.09, 0.27, 0.71, 0.08, 0.26, 0.08, 0.16, 0.09, 0.13, 0.1, 0.08,
    0.11, 0.33, 0.11, 0.28, 0.07, 0.1, 0.32, 0.22, 0.07, 0.05, 0.24, 0.38, 0.1, 0.15, 0.08, 0.14,
    0.1, 0.07, 0.04, 0.19, 0.56, 0.14, 0.58, 0.32, 0.82, 0.74, 0.15, 0.47, 0.17, 0.44, 0.15, 0.5,
    0.48,
])
ASAH_WFNS = np.array([
    1, 1, 1, 1, 3, 2, 5, 4, 1, 2, 5, 2, 5, 5, 1, 2, 5, 2, 2, 5, 2, 1, 1, 1, 1, 2, 1, 2, 1, 1, 3, 4,
    2, 1, 4, 5, 4, 1, 4, 2, 5, 5, 1, 1, 2, 4, 1, 1, 2, 5, 5, 2, 1, 2, 5, 1, 2, 2, 2, 1, 5, 1, 1, 2,
    5, 2, 1, 4, 5, 2, 4, 4, 1, 4, 1, 2, 1, 4, 2, 1, 2, 3, 2, 4, 2, 1, 4, 5, 1, 1, 5, 4, 2, 2, 1, 1,
    1, 3, 1, 2, 5, 2, 2, 5, 5, 5, 2, 4, 4, 5, 1, 1, 1,
])
ASAH_NDKA = np.array([
    3.01, 8.54, 8.09, 10.42, 17.4, 12.75, 6, 13.2, 15.54, 6.01, 15.96, 17.86, 5.18, 8.9, 13.41,
    20.75, 11.6, 16.11, 32.37, 54.82, 32.41, 49.94, 40.34, 9.47, 6.29, 12.53, 6.54, 6.3, 80.3, 12.8,
    9.8, 9.81, 9.85, 18.21, 5.03, 14.04, 21.93, 8.02, 7.42, 8.38, 6.59, 9.63, 13.12, 7.96, 14.34,
    41.43, 7.63, 7.06, 12.59, 13.56, 3.87, 9.44, 7.66, 12.98, 419.19, 27.19, 22.27, 9.95, 21.22,
    11.73, 10.4, 58.83, 6.39, 11.09, 12.22, 13.67, 17.21, 22.63, 12.9, 9.7, 21.57, 8.23, 72.57,
    15.54, 10.51, 10.6, 14.57, 5.19, 9.63, 4.61, 21.48, 17.3, 12.71, 9.44, 11.07, 19.46, 10.83,
    5.37, 11.97, 7.75, 9.83, 10.55, 28.49, 8.53, 12.57, 12.9, 46.83, 11.68, 12.67, 9.01, 9.57,
    34.06, 11.72, 14.26, 47.61, 11.67, 24.58, 10.33, 13.87, 15.89, 22.43, 6.79, 13.45,
])
ASAH = {"s100b": ASAH_S100B, "wfns": ASAH_WFNS, "ndka": ASAH_NDKA}
Z95 = stats.norm.ppf(0.975)


def test_asah_table_is_complete():
    assert len(ASAH_POOR) == len(ASAH_S100B) == len(ASAH_WFNS) == len(ASAH_NDKA) == 113
    assert ASAH_POOR.sum() == 41


# --- DeLong -------------------------------------------------------------------------------------


def test_delong_matches_proc_documented_output_to_3_decimals():
    """pROC: roc.test(roc(aSAH$outcome, aSAH$s100b), roc(aSAH$outcome, aSAH$wfns))."""
    r = delong_test(ASAH_POOR, ASAH_S100B, ASAH_WFNS)
    assert round(r["auc_a"], 4) == 0.7314
    assert round(r["auc_b"], 4) == 0.8237
    assert round(r["z"], 3) == -2.209
    assert round(r["p"], 5) == 0.02718


@pytest.mark.parametrize(
    "a,b,z,p,lo,hi",
    [  # pROC tests/testthat/test-roc.test.R: roc.test(r.a, r.b), DeLong, paired, two-sided
        ("wfns", "s100b", 2.20898359144091, 0.0271757822291882, 0.0104061769564846, 0.174214419249478),
        ("wfns", "ndka", 2.79777591868904, 0.00514557970691098, 0.0634011709339876, 0.3600405634833566),
        ("ndka", "s100b", -1.39077002573558, 0.164295175223054, -0.2876917446341914, 0.0488706064228094),
    ],
)
def test_delong_matches_proc_test_suite(a, b, z, p, lo, hi):
    r = delong_test(ASAH_POOR, ASAH[a], ASAH[b])
    assert r["z"] == pytest.approx(z, rel=1e-9)
    assert r["p"] == pytest.approx(p, rel=1e-9)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi), rel=1e-9)
    assert r["diff"] == pytest.approx(r["auc_a"] - r["auc_b"])
    swapped = delong_test(ASAH_POOR, ASAH[b], ASAH[a])
    assert swapped["z"] == pytest.approx(-z, rel=1e-9)
    assert swapped["p"] == pytest.approx(p, rel=1e-9)


def test_delong_ci_matches_proc():
    # test-ci.auc.R: ci.auc(r.ndka) = 0.501244999271703, 0.611957994579946, 0.722670989888189
    auc, low, high = delong_ci(ASAH_POOR, ASAH_NDKA)
    assert (low, auc, high) == pytest.approx((0.501244999271703, 0.611957994579946, 0.722670989888189), rel=1e-9)
    # test-var.R: var(r.wfns), var(r.s100b); unclipped intervals are auc +- z * sqrt(var)
    for name, var in (("wfns", 0.00146991470882363), ("s100b", 0.00266868245717244)):
        auc, low, high = delong_ci(ASAH_POOR, ASAH[name])
        assert ((high - low) / (2 * Z95)) ** 2 == pytest.approx(var, rel=1e-9)


def test_delong_identical_arms_give_z0_p1():
    r = delong_test(ASAH_POOR, ASAH_WFNS, ASAH_WFNS)
    assert r["z"] == 0 and r["p"] == 1 and r["se"] == 0


def test_delong_agrees_with_brute_force_on_tied_scores():
    """AUROC equals sklearn's, and the covariance equals DeLong's O(m n) definition."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 90)
    a = rng.integers(0, 6, 90) + y  # coarse scores: many ties
    b = 0.5 * a + rng.integers(0, 4, 90)
    r = delong_test(y, a, b)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)

    def components(s):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return psi.mean(axis=1), psi.mean(axis=0)

    (a10, a01), (b10, b01) = components(a), components(b)
    m, n = (y == 1).sum(), (y == 0).sum()
    var = (np.var(a10 - b10, ddof=1) / m) + (np.var(a01 - b01, ddof=1) / n)
    assert r["se"] == pytest.approx(np.sqrt(var), rel=1e-12)


def test_delong_rejects_one_class_and_mismatched_lengths():
    with pytest.raises(ValueError, match="one class"):
        delong_test(np.ones(5), np.arange(5), np.arange(5))
    with pytest.raises(ValueError, match="length"):
        delong_test(np.array([0, 1, 0, 1]), np.arange(4), np.arange(3))


# --- Nadeau-Bengio corrected resampled t-test --------------------------------------------------


@pytest.fixture(scope="module")
def sklearn_example_fold_scores():
    """Fold AUROCs of the scikit-learn gallery example (same data, estimators and CV splits)."""
    from sklearn.datasets import make_moons
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score
    from sklearn.svm import SVC

    X, y = make_moons(noise=0.352, random_state=1, n_samples=100)
    cv = RepeatedStratifiedKFold(n_splits=10, n_repeats=10, random_state=0)
    kernels = {"rbf": {"kernel": "rbf"}, "linear": {"kernel": "linear"},
               "3_poly": {"kernel": "poly", "degree": 3}, "2_poly": {"kernel": "poly", "degree": 2}}
    return {
        name: cross_val_score(SVC(random_state=0, **kw), X, y, scoring="roc_auc", cv=cv)
        for name, kw in kernels.items()
    }


def test_corrected_ttest_matches_sklearn_example(sklearn_example_fold_scores):
    s = sklearn_example_fold_scores
    r = corrected_resampled_ttest(s["rbf"] - s["linear"], n_train=90, n_test=10)
    assert r["df"] == 99
    assert round(r["t"], 3) == 0.750
    assert round(r["p"] / 2, 3) == 0.227  # the example reports the one-sided p
    assert round(r["ci_low"], 6) == -0.016445
    assert round(r["ci_high"], 6) == 0.036445
    for a, b, t in (("rbf", "3_poly", 1.657), ("rbf", "2_poly", 4.565), ("linear", "3_poly", 1.111),
                    ("linear", "2_poly", 4.276), ("3_poly", "2_poly", 3.851)):
        assert round(corrected_resampled_ttest(s[a] - s[b], 90, 10)["t"], 3) == t


def test_corrected_ttest_hand_example():
    # diffs 0.02, 0.01, 0.03, 0.00, 0.04 from 5 folds, 80 train / 20 test:
    # mean 0.02, s^2 = 0.001 / 4 = 0.00025, corrected var = 0.00025 * (1/5 + 20/80) = 0.0001125
    # se = 0.0106066, t = 0.02 / 0.0106066 = 1.885618, df = 4
    r = corrected_resampled_ttest([0.02, 0.01, 0.03, 0.00, 0.04], n_train=80, n_test=20)
    assert r["mean_diff"] == pytest.approx(0.02)
    assert r["se"] == pytest.approx(np.sqrt(0.0001125))
    assert r["t"] == pytest.approx(1.885618, abs=1e-6)
    assert r["df"] == 4
    assert r["p"] == pytest.approx(2 * stats.t.sf(1.885618, 4), abs=1e-6)
    half = stats.t.ppf(0.975, 4) * np.sqrt(0.0001125)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.02 - half, 0.02 + half))


def test_corrected_ttest_is_the_paired_ttest_with_inflated_variance():
    rng = np.random.default_rng(0)
    d = rng.normal(0.01, 0.03, 50)
    r = corrected_resampled_ttest(d, n_train=160, n_test=40)
    plain = stats.ttest_1samp(d, 0.0)
    assert r["t"] * np.sqrt((1 / 50 + 40 / 160) / (1 / 50)) == pytest.approx(plain.statistic)
    assert r["p"] > plain.pvalue


def test_corrected_ttest_drops_nan_folds_and_accepts_kr():
    r = corrected_resampled_ttest([0.02, np.nan, 0.01, 0.03], 80, 20)
    assert r["df"] == 2
    assert corrected_resampled_ttest([0.02, 0.01, 0.03], 80, 20, k_folds_times_repeats=10)["df"] == 9
    with pytest.raises(ValueError):
        corrected_resampled_ttest([0.02], 80, 20)


# --- Wilcoxon / Hodges-Lehmann ------------------------------------------------------------------


def test_wilcoxon_statistic_and_p_are_scipys():
    rng = np.random.default_rng(1)
    a = rng.normal(0.80, 0.05, 20)
    b = a - 0.02 + rng.normal(0, 0.03, 20)
    r = wilcoxon_test(a, b)
    ref = stats.wilcoxon(a, b)
    assert (r["statistic"], r["p"]) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    assert r["median_diff"] == pytest.approx(np.median(a - b))
    assert r["ci_low"] < r["hl_estimate"] < r["ci_high"]


def test_hodges_lehmann_interval_inverts_the_exact_signed_rank_test():
    """Shifts inside the interval are not rejected at 5 %, shifts just outside are."""
    rng = np.random.default_rng(2)
    d = rng.normal(0.01, 0.02, 12)
    r = wilcoxon_test(d, np.zeros(12))
    walsh = np.sort([(d[i] + d[j]) / 2 for i in range(12) for j in range(i, 12)])
    assert r["hl_estimate"] == pytest.approx(np.median(walsh))
    eps = 1e-9

    def p_at(shift):
        return stats.wilcoxon(d - shift, method="exact").pvalue

    assert p_at(r["ci_low"] + eps) > 0.05 and p_at(r["ci_high"] - eps) > 0.05
    assert p_at(r["ci_low"] - eps) <= 0.05 and p_at(r["ci_high"] + eps) <= 0.05


def test_hodges_lehmann_interval_undefined_for_tiny_samples():
    r = wilcoxon_test([0.8, 0.7, 0.9, 0.75, 0.85], [0.7, 0.72, 0.8, 0.7, 0.8])
    assert np.isnan(r["ci_low"]) and np.isnan(r["ci_high"])


# --- patient bootstrap --------------------------------------------------------------------------


def _cohort(n_patients, seed=0, rows_per_patient=2):
    rng = np.random.default_rng(seed)
    y_pat = rng.integers(0, 2, n_patients)
    patients = np.repeat(np.arange(n_patients), rows_per_patient)
    y = np.repeat(y_pat, rows_per_patient)
    scores = y + rng.normal(0, 1.2, len(y))
    return y, scores, patients


def _auc(y, s):
    """Mann-Whitney AUROC: same value as roc_auc_score, a fraction of its per-call cost."""
    pos = y == 1
    m, n = pos.sum(), (~pos).sum()
    return (stats.rankdata(s)[pos].sum() - m * (m + 1) / 2) / (m * n)


def test_bootstrap_ci_is_seeded_and_contains_the_point():
    y, s, pat = _cohort(120)
    first = bootstrap_ci(y, s, pat, _auc, n_boot=300, seed=5)
    assert bootstrap_ci(y, s, pat, _auc, n_boot=300, seed=5) == first
    assert bootstrap_ci(y, s, pat, _auc, n_boot=300, seed=6) != first
    point, low, high = first
    assert point == pytest.approx(roc_auc_score(y, s))
    assert low < point < high


def test_bootstrap_ci_narrows_with_more_patients():
    small = bootstrap_ci(*_cohort(60, seed=1), _auc, n_boot=300)
    large = bootstrap_ci(*_cohort(960, seed=1), _auc, n_boot=300)
    assert (large[2] - large[1]) < 0.5 * (small[2] - small[1])


def test_bootstrap_resamples_whole_patients():
    """Each patient's rows arrive together: a patient drawn k times brings k x its rows."""
    rows = np.array([1, 3, 2, 4, 1, 2])
    patients = np.repeat(np.arange(6), rows)
    rng = np.random.default_rng(0)
    patients = patients[rng.permutation(len(patients))]  # rows of a patient need not be adjacent
    y = (patients % 2).astype(int)
    seen = []

    def record(yb, sb):
        counts = np.bincount(sb.astype(int), minlength=6)
        seen.append(counts)
        return 0.0

    bootstrap_ci(y, patients.astype(float), patients, record, n_boot=50, seed=1)
    for counts in seen[:-1]:  # the last call is the point estimate on all rows
        assert np.all(counts % rows == 0)
    assert np.array_equal(seen[-1], rows)


def test_bootstrap_skips_single_class_resamples():
    # one positive patient among 8: many resamples hold no positive; roc_auc_score would raise
    y = np.array([1] + [0] * 7)
    s = np.linspace(0, 1, 8)[::-1]
    point, low, high = bootstrap_ci(y, s, np.arange(8), roc_auc_score, n_boot=200, seed=0)
    assert point == 1.0 and (low, high) == pytest.approx((1.0, 1.0))


def test_bootstrap_metrics():
    y, s, pat = _cohort(100, seed=3)
    out = bootstrap_metrics(y, s, pat, threshold=0.5, n_boot=60, seed=0)
    assert set(out) == set(METRICS)  # AUROC, balanced accuracy, F1 and the clinicians' rates
    point = binary_metrics(y, s, 0.5)
    for m, v in out.items():
        assert v["point"] == pytest.approx(point[m])
        assert v["low"] <= v["point"] <= v["high"]
    assert bootstrap_metrics(y, s, pat, threshold=0.5, n_boot=60, seed=0) == out


# --- calibration --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated():
    rng = np.random.default_rng(0)
    p = 1 / (1 + np.exp(-rng.normal(-0.5, 1.2, 20000)))
    return rng.binomial(1, p), p


def test_calibrated_predictions_have_slope_1_intercept_0(calibrated):
    y, p = calibrated
    r = calibration_slope_intercept(y, p)
    assert abs(r["slope"] - 1) < 0.1 and abs(r["intercept"]) < 0.1
    assert r["slope_low"] < 1 < r["slope_high"]


def test_overconfident_predictions_have_slope_below_1(calibrated):
    y, p = calibrated
    lp = np.log(p / (1 - p))
    over = 1 / (1 + np.exp(-2 * lp))  # pushed away from 0.5
    r = calibration_slope_intercept(y, over)
    assert r["slope"] < 0.6
    too_high = 1 / (1 + np.exp(-(lp + 0.5)))  # right spread, too high on average
    r = calibration_slope_intercept(y, too_high)
    assert r["intercept"] == pytest.approx(-0.5, abs=0.1)
    assert abs(r["slope"] - 1) < 0.1


def test_calibration_handles_probabilities_of_exactly_0_and_1():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    p = np.array([0.0, 0.8, 1.0, 0.3, 0.4, 0.6, 0.9, 0.1])  # overlapping classes
    r = calibration_slope_intercept(y, p)
    assert np.isfinite(r["slope"]) and np.isfinite(r["intercept"])


def test_brier_and_calibration_curve(calibrated):
    y, p = calibrated
    assert brier_score(y, p) == pytest.approx(np.mean((p - y) ** 2))
    curve = calibration_curve(y, p, n_bins=10)
    assert len(curve["prob_pred"]) == len(curve["prob_true"]) == 10
    assert np.allclose(curve["prob_pred"], curve["prob_true"], atol=0.05)


def test_decision_curve_reference_strategies_and_hand_value():
    rng = np.random.default_rng(4)
    p = rng.uniform(0, 1, 300)
    y = rng.binomial(1, p)
    dc = decision_curve(y, p)
    assert isinstance(dc, pd.DataFrame)
    assert list(dc.columns) == ["threshold", "net_benefit_model", "net_benefit_all", "net_benefit_none"]
    assert len(dc) == 99
    t = dc["threshold"].to_numpy()
    prev = y.mean()
    assert np.all(dc["net_benefit_none"] == 0)
    assert np.allclose(dc["net_benefit_all"], prev - (1 - prev) * t / (1 - t))
    row = dc.iloc[np.argmin(np.abs(t - 0.3))]
    treat = p >= row["threshold"]
    tp, fp = np.sum(treat & (y == 1)), np.sum(treat & (y == 0))
    assert row["net_benefit_model"] == pytest.approx(tp / 300 - fp / 300 * 0.3 / 0.7)
