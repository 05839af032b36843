"""Predicted risks after class-balanced sampling or CutMix / MixUp, and their correction.

A class-balanced sampler shows the network positives and negatives equally often, so its
outputs estimate risks at a prevalence of 0.5, not the cohort's; decision curves, which read
predictions as risks, are then biased. Under such a pure prior shift the Bayes-optimal
correction is on the logit scale (Saerens et al. 2002, Neural Computation 14:21):

    logit p' = logit p + logit(pi_train) - logit(0.5)

with pi_train the training part's share of positive images (the sampler reweights images).
It is applied per fold with that fold's own training prevalence (or the cohort's image
prevalence for folds written before it was recorded), to each image before its patient's
scores are aggregated. Being monotone it leaves every AUROC and every decision at the mapped
threshold unchanged: only calibration and net benefit move. CutMix and MixUp train on mixed
soft labels, which pulls predictions towards the middle; no closed-form correction exists for
that, so the report says so and points to logistic recalibration: per fold in the study
(`evaluation.recalibrate`, `recalibration.py`) or on an external cohort (`stagewise evaluate
--recalibrate`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit, logit

SAMPLED_PRIOR = 0.5
_EPS = 1e-6


def prior_shift(p, train_prior, sampled_prior: float = SAMPLED_PRIOR) -> np.ndarray:
    """Probabilities from a model trained at `sampled_prior`, moved to `train_prior` (a number,
    or one per probability)."""
    train_prior = np.asarray(train_prior, dtype=float)
    if not (np.all((train_prior > 0) & (train_prior < 1)) and 0 < sampled_prior < 1):
        raise ValueError(f"priors must lie strictly between 0 and 1, got {train_prior} and {sampled_prior}")
    z = logit(np.clip(np.asarray(p, dtype=float), _EPS, 1 - _EPS))
    return expit(z + logit(train_prior) - logit(sampled_prior))


def sampling_of(arm) -> dict:
    """Which stages of an arm sampled classes evenly or mixed images (1-based stage numbers);
    `final_balanced`: whether the last stage, which the evaluated model comes from, did."""
    stages = list(arm.stages)
    balanced = [i + 1 for i, s in enumerate(stages) if getattr(s, "balanced_sampling", False)]
    mixing = [f"{i + 1} ({'CutMix' if getattr(s, 'cutmix', None) else 'MixUp'})" for i, s in enumerate(stages)
              if getattr(s, "cutmix", None) or getattr(s, "mixup", None)]
    return {"balanced_sampling_stages": balanced, "mixing_stages": mixing,
            "final_balanced": bool(stages) and bool(getattr(stages[-1], "balanced_sampling", False))}


def shifted_predictions(predictions: pd.DataFrame, folds: list[dict], cohort_prior: float) -> tuple[pd.DataFrame, str]:
    """A unit's predictions with each fold's probabilities prior-shift corrected, and where the
    training prevalence came from ("fold": recorded per fold; "cohort": the cohort's image
    prevalence, for folds that did not record it)."""
    priors = {(f["repeat"], f["fold"]): f.get("train_prevalence_images") for f in folds}
    known = all(v is not None and np.isfinite(v) for v in priors.values())
    out = predictions.copy()
    prior = np.array([priors[k] if known else cohort_prior for k in zip(out["repeat"], out["fold"])], dtype=float)
    ok = out["prob"].notna().to_numpy()
    out.loc[ok, "prob"] = prior_shift(out.loc[ok, "prob"].to_numpy(), prior[ok])
    return out, "fold" if known else "cohort"
