"""Decision thresholds: each named rule computed from (labels, scores), and the inner
out-of-fold scores a rule is chosen on when it must not see scores of the model's own
training patients.

A network fine-tuned on a few hundred images ranks its own training patients almost
perfectly, so any cut-off chosen on those scores (Youden's among them) is close to arbitrary:
it can fall anywhere in the gap between the classes, and on the test patients it may call
everyone negative. `inner_oof_scores` gives scores of the training part that no model saw in
training (patient-grouped inner folds); `threshold_for` applies the recipe's rule to either.
Every rule reads sklearn's `roc_curve` without dropping points, so a target-sensitivity cut-off
reaches at least its target on the scores it was chosen on.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.metrics import roc_curve

from stagewise.evaluation.splits import make_splits
from stagewise.recipe import ProtocolConfig, ThresholdRule

UNRELIABLE_AUROC = 0.99
"""A training AUROC at or above this: the training scores separate (almost) perfectly."""
UNRELIABLE_SENTENCE = ("thresholds chosen on training scores that separate perfectly: the decision figures are "
                       "unreliable; use `on: inner_cv`")
"""Said in log.txt, once on screen and in the report beside the threshold-based figures."""


def as_rule(how) -> ThresholdRule:
    """A `ThresholdRule` from the recipe's field or a short form (`youden`, 0.5, a mapping)."""
    return how if isinstance(how, ThresholdRule) else ThresholdRule.model_validate(how)


def threshold_for(y: np.ndarray, scores: np.ndarray, how) -> float:
    """The cut-off of `how` (a `ThresholdRule` or a short form) on these labels and scores;
    a positive call is score >= cut-off. With one class only, 0.5 (no rule has a meaning)."""
    rule = as_rule(how)
    if rule.fixed:
        return float(rule.value)
    y, scores = np.asarray(y, dtype=int), np.asarray(scores, dtype=float)
    if len(np.unique(y)) < 2:
        return 0.5
    if rule.rule == "prevalence":
        return float(np.quantile(scores, 1 - np.mean(y)))
    fpr, tpr, thr = roc_curve(y, scores, drop_intermediate=False)
    # roc_curve's first cut-off is +inf (nobody flagged): just above the highest score instead (1.0 for
    # probabilities, as before); every other cut-off is a score itself (a baseline's may exceed 1)
    thr[0] = 1.0 if scores.max() < 1.0 else np.nextafter(scores.max(), np.inf)
    if rule.rule == "sensitivity":  # the highest cut-off reaching the target: the fewest false positives
        return float(thr[np.argmax(tpr >= rule.value - 1e-12)])
    if rule.rule == "specificity":  # the lowest cut-off keeping the target: the most true positives
        return float(thr[np.flatnonzero(1 - fpr >= rule.value - 1e-12)[-1]])
    if rule.rule == "net_benefit":
        prevalence = np.mean(y)
        benefit = tpr * prevalence - fpr * (1 - prevalence) * rule.value / (1 - rule.value)
        return float(thr[np.argmax(benefit)])
    return float(thr[np.argmax(tpr - fpr)])  # youden


def threshold_unreliable(how, train_auroc: float) -> bool:
    """A rule chosen on the fold model's own training scores when those separate (almost)
    perfectly: its cut-off is close to arbitrary."""
    rule = as_rule(how)
    return (not rule.fixed and rule.on == "training" and train_auroc is not None
            and bool(np.isfinite(train_auroc)) and train_auroc >= UNRELIABLE_AUROC)


def inner_oof_scores(train: np.ndarray, y: np.ndarray, patients: np.ndarray, folds: int, seed: int,
                     fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     inner: list | None = None) -> np.ndarray:
    """Scores of the rows `train` (indices into `y`/`patients`), each from a model that did not
    train on its patient: `folds` stratified patient-grouped inner folds of `train`, and
    `fit_predict(rows_fit, rows_score)` (cohort row indices) returning scores of `rows_score`
    (one column per outcome). `inner`: splits of `train` already made (a nested-CV arm's);
    its folds are positions in `train`. Rows no inner fold scored stay NaN."""
    if inner is None:
        inner = make_splits(y[train], patients[train], ProtocolConfig(folds=folds, repeats=1), seed)
    out = None
    for s in inner:
        p = np.asarray(fit_predict(train[s.train], train[s.test]), dtype=float).reshape(len(s.test), -1)
        if out is None:
            out = np.full((len(train), p.shape[1]), np.nan)
        out[s.test] = p
    return out
