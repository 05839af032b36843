"""Discrimination and calibration pooled across sites from sums alone.

A federated evaluation (`stagewise federation evaluate`) never moves a patient's score: each
site sends per-class counts of its patients' scores in fixed bins, its confusion counts at the
bundle's threshold and a few sums, all of which add up across sites. This module turns those
sums into pooled figures.

AUROC from per-class histograms, and why it has an exact bound. The AUROC is the share of
(positive, negative) patient pairs in which the positive scores higher, ties counting one
half. With fixed bins that only ever put a higher score into the same or a higher bin, a pair
whose two scores fall into different bins is ordered exactly as the scores are; only the
pairs within one bin are unknown. With P_b positives and N_b negatives in bin b, n+ and n-
in all:

    lower = sum_{b > c} P_b N_c / (n+ n-)         (every same-bin pair counted as the positive lower)
    upper = lower + sum_b P_b N_b / (n+ n-)       (every same-bin pair counted as the positive higher)

and the AUROC of the unbinned scores lies in [lower, upper] whatever the scores inside each
bin are. The point reported is the midpoint (same-bin pairs as ties, the AUROC of the bin
indices), so it is within `half_width = sum_b P_b N_b / (2 n+ n-)` of the unbinned AUROC.
The bound depends on the data (how many pairs share a bin), so it is computed and stated
with each pooled AUROC, not assumed.
"""

from __future__ import annotations

import numpy as np
from statsmodels.stats.proportion import proportion_confint

DEFAULT_BINS = 100
"""Equal-width bins of the probability on [0, 1] (0.01 wide), and as many more edges at the
quantiles of the bundle's development scores where it has them (`score_edges`)."""
SUMS = ("tp", "fp", "tn", "fn", "n_patients", "n_positive", "sum_probability", "sum_squared_error")
"""The order of a site's summable scalars (`site_sums`)."""


def score_edges(bins: int = DEFAULT_BINS, reference: np.ndarray | None = None) -> np.ndarray:
    """The bins' edges, fixed before any site's score is seen: `bins` equal-width bins on
    [0, 1], plus, given `reference` scores (a bundle's out-of-fold development probabilities),
    `bins` - 1 edges at their quantiles. A model whose scores crowd into a narrow band (common
    for a small cohort) then still has many bins where its scores lie, which keeps the AUROC's
    binning bound narrow; the equal-width edges keep it bounded when a site's scores fall
    elsewhere."""
    if int(bins) < 2:
        raise ValueError(f"bins {bins}: give at least 2")
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    ref = np.asarray(reference if reference is not None else [], dtype=float)
    ref = ref[np.isfinite(ref)]
    if len(ref) >= 2:
        inner = np.quantile(np.clip(ref, 0.0, 1.0), np.linspace(0, 1, int(bins) + 1)[1:-1])
        edges = np.unique(np.concatenate([edges, inner]))
    return edges


def class_histograms(y: np.ndarray, scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(2, bins) counts: row 0 the negatives' scores, row 1 the positives', per bin [e_i, e_i+1)
    of `edges` (a score of exactly 1 in the last bin). Monotone: a higher score never lands in
    a lower bin."""
    edges = np.asarray(edges, dtype=float)
    y, s = np.asarray(y).astype(int), np.clip(np.asarray(scores, dtype=float), 0.0, 1.0)
    index = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, len(edges) - 2)
    out = np.zeros((2, len(edges) - 1))
    np.add.at(out, (y, index), 1.0)
    return out


def site_sums(y: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """The site's summable scalars in the order of SUMS: confusion counts at `threshold`
    (positive at score >= threshold), patients, positives, the sum of the probabilities
    (calibration-in-the-large) and of the squared errors (Brier score)."""
    y, s = np.asarray(y).astype(int), np.asarray(scores, dtype=float)
    d = s >= threshold
    return np.array([(d & (y == 1)).sum(), (d & (y == 0)).sum(), (~d & (y == 0)).sum(), (~d & (y == 1)).sum(),
                     len(y), y.sum(), s.sum(), ((s - y) ** 2).sum()], dtype=float)


def binned_auroc(histograms: np.ndarray) -> dict:
    """The AUROC from (2, bins) class histograms: `point` (same-bin pairs as ties), `lower`
    and `upper` (the exact bounds of the module's docstring) and `half_width`; None values
    when a class is absent."""
    neg, pos = np.asarray(histograms, dtype=float)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return {"point": None, "lower": None, "upper": None, "half_width": None}
    below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    pairs = n_pos * n_neg
    lower = float((pos * below).sum() / pairs)
    same = float((pos * neg).sum() / pairs)
    return {"point": lower + same / 2, "lower": lower, "upper": lower + same, "half_width": same / 2}


def _rate(k: float, n: float) -> dict:
    if n <= 0:
        return {"point": None, "low": None, "high": None}
    low, high = proportion_confint(int(round(k)), int(round(n)), alpha=0.05, method="wilson")
    return {"point": float(k / n), "low": float(low), "high": float(high)}


def pooled_figures(sums: np.ndarray, histograms: np.ndarray) -> dict:
    """Pooled figures from the sites' summed SUMS and histograms: the binned AUROC with its
    bound, sensitivity, specificity, PPV and NPV at the threshold (Wilson 95 % intervals:
    each patient counts once), the Brier score, and calibration-in-the-large as the mean
    predicted probability against the observed rate (their difference and ratio)."""
    c = dict(zip(SUMS, np.asarray(sums, dtype=float)))
    n = c["n_patients"]
    mean_p = c["sum_probability"] / n if n else None
    observed = c["n_positive"] / n if n else None
    return {
        "n_patients": int(n), "n_positive": int(c["n_positive"]),
        "auroc_binned": binned_auroc(histograms),
        "at_threshold": {"tp": int(c["tp"]), "fp": int(c["fp"]), "tn": int(c["tn"]), "fn": int(c["fn"]),
                         "sensitivity": _rate(c["tp"], c["tp"] + c["fn"]),
                         "specificity": _rate(c["tn"], c["tn"] + c["fp"]),
                         "ppv": _rate(c["tp"], c["tp"] + c["fp"]), "npv": _rate(c["tn"], c["tn"] + c["fn"])},
        "brier": c["sum_squared_error"] / n if n else None,
        "calibration_in_the_large": {
            "mean_predicted": mean_p, "observed_rate": observed,
            "observed_minus_predicted": None if mean_p is None else observed - mean_p,
            "observed_over_expected": c["n_positive"] / c["sum_probability"] if c["sum_probability"] > 0 else None},
    }
