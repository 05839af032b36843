"""Comparing arms evaluated on the same patients, and uncertainty for one arm.

Small cohorts make point estimates noisy, so every comparison a study reports carries a test
and an interval (METHODS.md, "Evaluation practice"):

- `delong_test` / `delong_ci`: AUROC of pooled out-of-fold predictions, two arms scored on the
  same patients (paired), with DeLong's variance computed by Sun & Xu's fast algorithm.
- `corrected_resampled_ttest`: fold-metric differences from repeated k-fold CV, with the
  Nadeau & Bengio variance correction for overlapping training sets.
- `wilcoxon_test`: the rank-based counterpart on the same fold differences.
- `bootstrap_ci` / `bootstrap_many` / `bootstrap_metrics`: percentile intervals resampling patients, so that
  images of one patient never count as independent evidence.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from scipy import stats

from stagewise.evaluation.metrics import METRICS, binary_metrics


def _binary_labels(y, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"labels must be a 1-D array of length {n}, got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("labels hold one class only; AUROC needs positives and negatives")
    return y


def _fast_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs and their DeLong covariance matrix for the rows of `scores` (one row per arm).

    Sun & Xu (2014, IEEE Signal Processing Letters 21:1389) replace DeLong's O(m n) pairwise
    comparisons by three midrankings: of the positives among themselves (tx), of the negatives
    among themselves (ty) and of everyone together (tz). A positive's structural component
    V10 = (tz - tx) / n is the share of negatives it outscores (ties counting one half); a
    negative's V01 = 1 - (tz - ty) / m is the share of positives that outscore it. The AUROC is
    the mean of either, and its covariance is S10 / m + S01 / n with S the sample covariances
    (ddof 1, as pROC) of the components across arms.
    """
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    tx = stats.rankdata(pos, axis=1)  # "average" ranks are midranks
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    aucs = v10.mean(axis=1)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def _scores_matrix(y, *columns) -> tuple[np.ndarray, np.ndarray]:
    arrays = [np.asarray(c, dtype=float).reshape(-1) for c in columns]
    if len({a.size for a in arrays}) != 1:
        raise ValueError("score arrays differ in length")
    scores = np.vstack(arrays)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return _binary_labels(y, scores.shape[1]), scores


def delong_ci(y, scores, level: float = 0.95) -> tuple[float, float, float]:
    """AUROC with DeLong's normal-theory interval, clipped to [0, 1] (pROC's `ci.auc`).

    Higher scores must mean "more likely positive"; the orientation is never flipped to make
    the AUROC exceed 0.5, because choosing the direction after seeing the data biases it up.
    """
    y, s = _scores_matrix(y, scores)
    aucs, cov = _fast_delong(y, s)
    auc, se = float(aucs[0]), float(np.sqrt(cov[0, 0]))
    half = float(stats.norm.ppf(0.5 + level / 2)) * se
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def delong_test(y, scores_a, scores_b, level: float = 0.95) -> dict[str, float]:
    """Paired DeLong test of AUROC(a) = AUROC(b), both arms scored on the same patients.

    Pass one pooled out-of-fold score per patient for each arm (see `patient_scores`): the
    covariance term is what makes the test paired, and it is only valid when the two arms'
    scores line up row for row. Returns auc_a, auc_b, diff (a - b), se, ci_low and ci_high
    (`level` interval of the difference), z and the two-sided p. Identical arms give z = 0,
    p = 1 (as pROC does).
    """
    y, s = _scores_matrix(y, scores_a, scores_b)
    aucs, cov = _fast_delong(y, s)
    diff = float(aucs[0] - aucs[1])
    se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
    if se > 0:
        z = diff / se
    else:
        z = 0.0 if diff == 0 else float(np.copysign(np.inf, diff))
    half = float(stats.norm.ppf(0.5 + level / 2)) * se
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "se": se,
        "ci_low": diff - half,
        "ci_high": diff + half,
        "z": float(z),
        "p": float(2 * stats.norm.sf(abs(z))),
    }


def corrected_resampled_ttest(
    diffs, n_train: float, n_test: float, k_folds_times_repeats: int | None = None, level: float = 0.95
) -> dict[str, float]:
    """Nadeau & Bengio (2003) corrected resampled t-test on per-fold metric differences.

    Folds of repeated k-fold CV share most of their training data, so fold metrics are
    correlated and the plain paired t-test's variance s^2 / (k r) is far too small (Dietterich
    1998; Bouckaert & Frank 2004). The correction inflates it to s^2 (1 / (k r) + n_test /
    n_train) and keeps df = k r - 1. With patient-grouped folds the sizes vary from fold to fold:
    pass the mean numbers of training and test patients (the unit that was split).

    Non-finite differences (folds where a metric was undefined) are dropped; `k_folds_times_repeats`
    defaults to the number of differences left. Returns mean_diff, se, t, df, the two-sided p, and
    ci_low / ci_high, the `level` interval of the mean difference on the same corrected scale.
    """
    d = np.asarray(diffs, dtype=float).reshape(-1)
    d = d[np.isfinite(d)]
    kr = len(d) if k_folds_times_repeats is None else int(k_folds_times_repeats)
    if len(d) < 2 or kr < 2:
        raise ValueError("need at least two fold differences")
    if n_train <= 0 or n_test <= 0:
        raise ValueError("n_train and n_test must be positive")
    mean = float(d.mean())
    se = float(np.sqrt(d.var(ddof=1) * (1.0 / kr + n_test / n_train)))
    df = kr - 1
    if se > 0:
        t = mean / se
    else:
        t = 0.0 if mean == 0 else float(np.copysign(np.inf, mean))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return {
        "mean_diff": mean,
        "se": se,
        "t": float(t),
        "df": df,
        "p": float(2 * stats.t.sf(abs(t), df)),
        "ci_low": mean - half,
        "ci_high": mean + half,
    }


def _signed_rank_null(n: int) -> np.ndarray:
    """P(T+ = s), s = 0 .. n(n+1)/2, for the Wilcoxon signed-rank statistic without ties.

    Each rank k enters T+ with probability 1/2, so the distribution is built one rank at a
    time; probabilities (not counts) keep it in float range for any number of folds.
    """
    dist = np.zeros(n * (n + 1) // 2 + 1)
    dist[0] = 1.0
    top = 0
    for k in range(1, n + 1):
        shifted = dist[: top + 1].copy()
        dist[: top + 1] *= 0.5
        dist[k : k + top + 1] += 0.5 * shifted
        top += k
    return dist


def wilcoxon_test(a, b, level: float = 0.95) -> dict[str, float]:
    """Wilcoxon signed-rank test on paired fold metrics, with a Hodges-Lehmann interval.

    The test is scipy.stats.wilcoxon(a, b) with its defaults (zero differences dropped). The
    interval is the Hodges-Lehmann one, not a bootstrap: the set of shifts the two-sided
    signed-rank test does not reject, i.e. order statistics c and M + 1 - c of the M = n(n+1)/2
    Walsh averages (d_i + d_j) / 2, i <= j, with c from the exact null distribution of T+
    (Hollander & Wolfe; R's wilcox.test(conf.int = TRUE)). It covers the pseudo-median of the
    differences, whose estimate (median of the Walsh averages) is `hl_estimate`; `median_diff`
    is the plain median of a - b. The interval needs n >= 6 pairs at level 0.95 (fewer cannot
    reach it) and is NaN below that; with tied differences its coverage is approximate.
    Pairs with a non-finite value are dropped.
    """
    a, b = np.asarray(a, dtype=float).reshape(-1), np.asarray(b, dtype=float).reshape(-1)
    if a.shape != b.shape:
        raise ValueError("a and b must be paired (same length)")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = len(d)
    if n < 2:
        raise ValueError("need at least two paired values")
    res = stats.wilcoxon(a[keep], b[keep])
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2)
    below = np.cumsum(_signed_rank_null(n))  # below[c] = P(T+ <= c)
    alpha = 1 - level
    c = int(np.searchsorted(below, alpha / 2, side="right"))  # largest c with P(T+ <= c - 1) <= alpha/2
    if c == 0:
        low = high = float("nan")
    else:
        low, high = float(walsh[c - 1]), float(walsh[len(walsh) - c])
    return {
        "statistic": float(res.statistic),
        "p": float(res.pvalue),
        "n": n,
        "median_diff": float(np.median(d)),
        "hl_estimate": float(np.median(walsh)),
        "ci_low": low,
        "ci_high": high,
    }


def _patient_resamples(patients, n_boot: int, seed: int):
    """Row indices of `n_boot` bootstrap cohorts, each drawing patients with replacement.

    A drawn patient brings all of its rows, and a patient drawn twice brings them twice, so the
    resample has the cohort's cluster structure; resampling rows instead would treat a patient's
    images as independent and make intervals too narrow.
    """
    _, inverse = np.unique(np.asarray(patients), return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # rows grouped by patient
    counts = np.bincount(inverse)
    starts = np.cumsum(counts) - counts
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        drawn = rng.integers(0, len(counts), size=len(counts))
        lens = counts[drawn]
        first_out = np.cumsum(lens) - lens  # where each drawn patient's rows begin in the resample
        pos = np.arange(lens.sum()) - np.repeat(first_out - starts[drawn], lens)
        yield order[pos]


def _percentiles(values: list[float], level: float) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _check_rows(y, scores, patients) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, scores, patients = np.asarray(y), np.asarray(scores, dtype=float), np.asarray(patients)
    if not (len(y) == len(scores) == len(patients)):
        raise ValueError("y, scores and patients must have the same length")
    return y, scores, patients


def bootstrap_ci(
    y,
    scores,
    patients,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """metric_fn(y, scores) on all rows, and its percentile bootstrap interval over patients.

    Resamples holding a single class are skipped (AUROC and balanced accuracy are undefined
    there, and any metric of a one-class cohort describes a different population), as are
    non-finite metric values; the interval uses the remaining resamples. The same seed gives
    the same interval (numpy Generator).
    """
    y, scores, patients = _check_rows(y, scores, patients)
    values = []
    for idx in _patient_resamples(patients, n_boot, seed):
        yb = y[idx]
        if len(np.unique(yb)) < 2:
            continue
        values.append(metric_fn(yb, scores[idx]))
    low, high = _percentiles(values, level)
    return float(metric_fn(y, scores)), low, high


def bootstrap_many(
    y, values, patients, metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]], names,
    n_boot: int = 2000, seed: int = 0, level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """`bootstrap_ci` for a function giving several metrics at once (`names` of them are kept):
    one pass of patient resamples for all, the same resamples `bootstrap_ci` draws for the
    seed, so each interval equals the one `bootstrap_ci` gives for that metric alone.
    `values` may have one column per input the function reads (scores, decisions)."""
    y, values, patients = _check_rows(y, values, patients)
    point = metric_fn(y, values)
    draws: dict[str, list[float]] = {m: [] for m in names}
    for idx in _patient_resamples(patients, n_boot, seed):
        yb = y[idx]
        if len(np.unique(yb)) < 2:
            continue
        got = metric_fn(yb, values[idx])
        for m in names:
            draws[m].append(got[m])
    out = {}
    for m in names:
        low, high = _percentiles(draws[m], level)
        out[m] = {"point": float(point[m]), "low": low, "high": high}
    return out


def bootstrap_metrics(
    y, scores, patients, threshold: float, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, dict[str, float]]:
    """Every rate of METRICS (`binary_metrics` at a fixed `threshold`) with patient bootstrap
    percentile intervals, all from the same resamples.

    The threshold stays fixed: it was chosen on training data, and re-choosing it inside each
    resample would describe a different procedure. Single-class resamples are skipped as in
    `bootstrap_ci`.
    """
    return bootstrap_many(y, scores, patients, lambda yy, ss: binary_metrics(yy, ss, threshold), METRICS,
                          n_boot=n_boot, seed=seed, level=level)


def bootstrap_curve(y, scores, patients, curve_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], n_boot: int = 500,
                    seed: int = 0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band of a curve (`curve_fn(y, scores)` -> values at fixed points)
    over patient resamples (`_patient_resamples`, as `bootstrap_ci`); resamples holding one
    class are skipped, and a point's band uses the resamples where it is finite (NaN where
    none is)."""
    y, scores, patients = _check_rows(y, scores, patients)
    draws = []
    for idx in _patient_resamples(patients, n_boot, seed):
        if len(np.unique(y[idx])) == 2:
            draws.append(np.asarray(curve_fn(y[idx], scores[idx]), dtype=float))
    if not draws:
        n = len(np.asarray(curve_fn(y, scores)))
        return np.full(n, np.nan), np.full(n, np.nan)
    stack = np.vstack(draws)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN points stay NaN
        low, high = np.nanquantile(stack, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return low, high


def auroc(y, scores) -> float:
    """AUROC as the Mann-Whitney statistic: the share of (positive, negative) pairs the positive
    outscores, ties counting one half (roc_auc_score's value), counted by binary search among the
    sorted negatives, without roc_auc_score's input checks: for the thousands of calls of a
    bootstrap."""
    y, s = np.asarray(y).astype(bool), np.asarray(scores, dtype=float)
    pos, neg = s[y], np.sort(s[~y])
    if not len(pos) or not len(neg):
        return float("nan")
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + ties.sum() / 2) / (len(pos) * len(neg)))
