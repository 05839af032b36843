"""Calibration and clinical utility of predicted probabilities.

Discrimination (AUROC) says whether a model ranks patients well; a clinical decision also
needs the probabilities themselves to be right (calibration) and a threshold at which acting
on them does more good than harm (net benefit). TRIPOD+AI asks for both.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.special import expit, logit
from sklearn.calibration import calibration_curve as _sk_calibration_curve
from sklearn.metrics import brier_score_loss

from stagewise.evaluation.statistics import bootstrap_curve

_EPS = 1e-6


def _labels_and_probs(y, p) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError("y and p must be 1-D arrays of the same length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("p must be probabilities in [0, 1]")
    return y.astype(int), p


def calibration_slope_intercept(y, p, level: float = 0.95) -> dict[str, float]:
    """Logistic recalibration, logit P(y = 1) = a + b logit(p) (Cox 1958; Van Calster 2016).

    - slope: b from a binomial GLM with logit(p) as the covariate. 1 is ideal; below 1 the
      predictions are too extreme (over-fitting, common on small cohorts), above 1 too modest.
    - intercept: calibration-in-the-large, the intercept of a GLM with logit(p) as an offset
      (slope fixed at 1), so that it measures only whether predictions are too high (< 0) or
      too low (> 0) on average, not mixed with miscalibrated spread.

    p is clipped to [1e-6, 1 - 1e-6] so that predictions of exactly 0 or 1 have a finite logit.
    Returns slope, slope_low, slope_high, intercept, intercept_low, intercept_high (Wald
    intervals at `level`).
    """
    y, p = _labels_and_probs(y, p)
    alpha = 1 - level
    slope_fit, citl_fit = _recalibration_glm(y, p, slope=True), _recalibration_glm(y, p, slope=False)
    slope_ci = slope_fit.conf_int(alpha)[1]
    citl_ci = citl_fit.conf_int(alpha)[0]
    return {
        "slope": float(slope_fit.params[1]),
        "slope_low": float(slope_ci[0]),
        "slope_high": float(slope_ci[1]),
        "intercept": float(citl_fit.params[0]),
        "intercept_low": float(citl_ci[0]),
        "intercept_high": float(citl_ci[1]),
    }


def _recalibration_glm(y: np.ndarray, p: np.ndarray, slope: bool):
    """The binomial GLM of y on logit(p): with logit(p) as a covariate (slope) or as an offset
    (intercept only, slope fixed at 1)."""
    # statsmodels and dcurves are imported where used: they cost ~1 s at import, and every
    # process of a federated deployment (one per Flower message) imports this module
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

    lp = logit(np.clip(p, _EPS, 1 - _EPS))
    with warnings.catch_warnings():
        # Perfectly separated predictions (common on small folds) give a huge slope, which is
        # the honest answer; statsmodels' warning about it would only clutter the run log.
        warnings.simplefilter("ignore", PerfectSeparationWarning)
        if slope:
            return sm.GLM(y, sm.add_constant(lp, has_constant="add"), family=sm.families.Binomial()).fit()
        return sm.GLM(y, np.ones((len(y), 1)), family=sm.families.Binomial(), offset=lp).fit()


def fit_recalibration(y, p, slope: bool = True) -> tuple[float, float]:
    """Logistic recalibration (Cox 1958; Steyerberg's "model updating"): the (a, b) of
    logit P(y = 1) = a + b logit(p) fitted on labelled data from the new setting.

    A model moved to another hospital usually keeps its ranking but not its probabilities (a
    different prevalence shifts them, a different case mix stretches them). slope=False
    refits only the intercept (b = 1: calibration-in-the-large, the smallest update, for
    small samples); slope=True refits both. Apply with `apply_recalibration`.
    """
    y, p = _labels_and_probs(y, p)
    if len(np.unique(y)) < 2:
        raise ValueError("recalibration needs positive and negative patients")
    fit = _recalibration_glm(y, p, slope)
    return (float(fit.params[0]), float(fit.params[1])) if slope else (float(fit.params[0]), 1.0)


def apply_recalibration(p, a: float, b: float) -> np.ndarray:
    """sigmoid(a + b logit(p)), p clipped as in the fit; b > 0 keeps the ranking (and AUROC)."""
    p = np.asarray(p, dtype=float)
    return expit(a + b * logit(np.clip(p, _EPS, 1 - _EPS)))


def brier_score(y, p) -> float:
    """Mean squared error of the probabilities (0 is perfect; prevalence x (1 - prevalence) is
    what predicting the prevalence for everyone scores)."""
    y, p = _labels_and_probs(y, p)
    return float(brier_score_loss(y, p))


def calibration_curve(y, p, n_bins: int = 10, strategy: str = "quantile") -> dict[str, list[float]]:
    """Observed event rate against mean predicted probability per bin (sklearn).

    Quantile bins by default: with a few hundred patients, uniform bins leave the extreme bins
    nearly empty and their observed rates meaningless. Empty bins are left out, so the lists
    can be shorter than `n_bins`. Returns {"prob_pred": [...], "prob_true": [...]}.
    """
    y, p = _labels_and_probs(y, p)
    prob_true, prob_pred = _sk_calibration_curve(y, p, n_bins=n_bins, strategy=strategy)
    return {"prob_pred": prob_pred.tolist(), "prob_true": prob_true.tolist()}


def decision_curve(y, p, thresholds=np.arange(0.01, 1.0, 0.01)) -> pd.DataFrame:
    """Net benefit of acting on the model, on everyone and on no one (Vickers & Elkin 2006).

    NB(t) = TP/n - FP/n * t / (1 - t), treating patients with p >= t; the odds t / (1 - t)
    is the harm of an unnecessary intervention relative to the benefit of a necessary one
    that a clinician choosing threshold t implies. Computed by `dcurves.dca`; treat-all is
    prevalence - (1 - prevalence) t / (1 - t) and treat-none is 0. Thresholds must lie in
    [0, 1). Returns one row per threshold with columns threshold, net_benefit_model,
    net_benefit_all, net_benefit_none.
    """
    import dcurves

    y, p = _labels_and_probs(y, p)
    thresholds = [float(t) for t in thresholds]
    if any(t < 0 or t >= 1 for t in thresholds):
        raise ValueError("thresholds must lie in [0, 1)")
    long = dcurves.dca(
        data=pd.DataFrame({"outcome": y, "model": p}),
        outcome="outcome",
        modelnames=["model"],
        thresholds=thresholds,
    )
    wide = long.pivot(index="threshold", columns="model", values="net_benefit")
    return pd.DataFrame(
        {
            "threshold": wide.index.to_numpy(dtype=float),
            "net_benefit_model": wide["model"].to_numpy(dtype=float),
            "net_benefit_all": wide["all"].to_numpy(dtype=float),
            "net_benefit_none": wide["none"].to_numpy(dtype=float),
        }
    )


def net_benefit(y, p, thresholds) -> np.ndarray:
    """Net benefit of the model at each threshold, TP/n - FP/n * t / (1 - t) treating p >= t:
    the formula of `decision_curve` without dcurves' tables, fast enough to repeat in every
    bootstrap resample of a decision-curve band."""
    y, p = _labels_and_probs(y, p)
    t = np.asarray(thresholds, dtype=float)
    treated = p[None, :] >= t[:, None]
    tp = (treated & (y[None, :] == 1)).sum(axis=1)
    fp = (treated & (y[None, :] == 0)).sum(axis=1)
    return tp / len(y) - fp / len(y) * t / (1 - t)


SMOOTH_POINTS = 41
"""Points of the smoothed calibration curve, evenly spread over the range of the predictions."""


def smoothed_calibration(y, p, grid) -> np.ndarray:
    """Observed rate against predicted probability as a LOWESS smooth of the 0/1 outcomes on the
    predictions, evaluated at `grid` (statsmodels; span 2/3 and no robustness iterations, as
    Harrell's `val.prob` and Van Calster et al. 2016 draw it: robustness weights would treat
    the rarer outcome as outliers). Clipped to [0, 1]; NaN outside the predictions' range."""
    from statsmodels.nonparametric.smoothers_lowess import lowess

    y, p = _labels_and_probs(y, p)
    grid = np.asarray(grid, dtype=float)
    if len(np.unique(p)) < 3:  # nothing to smooth over
        return np.full(len(grid), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fitted = lowess(y.astype(float), p, frac=2 / 3, it=0, xvals=grid)
    fitted = np.clip(fitted, 0.0, 1.0)
    fitted[(grid < p.min()) | (grid > p.max())] = np.nan
    return fitted


def curve_bands(y, p, thresholds, n_boot: int, seed: int, level: float = 0.95) -> dict:
    """The smoothed calibration curve (`smoothed_calibration` on SMOOTH_POINTS points over the
    predictions' range) and, with `n_boot` > 0, percentile bands over `n_boot` resamples of the
    rows (one row per patient: patients are resampled) for it and for the net benefit at
    `thresholds` (`net_benefit`). Returns {"smooth": {prob, observed[, low, high]},
    "net_benefit": {low, high} (with n_boot only)}."""
    y, p = _labels_and_probs(y, p)
    grid = np.linspace(p.min(), p.max(), SMOOTH_POINTS)
    smooth = {"prob": grid.round(5).tolist(), "observed": _rounded(smoothed_calibration(y, p, grid)),
              "method": "LOWESS (span 2/3, no robustness iterations)"}
    out = {"smooth": smooth}
    if n_boot:
        ids = np.arange(len(y))
        low, high = bootstrap_curve(y, p, ids, lambda yy, pp: smoothed_calibration(yy, pp, grid), n_boot, seed, level)
        smooth["low"], smooth["high"] = _rounded(low), _rounded(high)
        low, high = bootstrap_curve(y, p, ids, lambda yy, pp: net_benefit(yy, pp, thresholds), n_boot, seed, level)
        out["net_benefit"] = {"low": _rounded(low), "high": _rounded(high)}
        out["resamples"] = int(n_boot)
    return out


def _rounded(values) -> list:
    """Values for metrics.json: 5 decimals, None where undefined (strict JSON has no NaN)."""
    return [None if not np.isfinite(v) else round(float(v), 5) for v in values]
