"""A bundle's threshold follows the protocol's rule: a refit applies it to the arm's
cross-validated out-of-fold patient scores, a fold bundle keeps its fold's, and the card and
the bedside page say by which rule and on which scores."""

import numpy as np

from conftest import small_recipe
from stagewise.bundle.export import refit_threshold
from stagewise.bundle.model_card import card_facts
from stagewise.evaluation.metrics import decision_metrics
from stagewise.serve.card import fold_threshold_words


def _recipe(threshold):
    return small_recipe("m.csv", [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe"}]}],
                        protocol={"threshold": threshold})


def _patients():
    rng = np.random.default_rng(0)
    label = (rng.random(60) < 0.3).astype(int)
    score = np.clip(0.3 + 0.25 * label + rng.normal(0, 0.15, 60), 0, 1)
    order = np.argsort(score)
    return {"n": 60, "n_positive": int(label.sum()), "score": score[order].tolist(), "label": label[order].tolist()}


def test_refit_threshold_is_the_rule_on_the_out_of_fold_scores():
    patients = _patients()
    value, words = refit_threshold(_recipe({"rule": "sensitivity", "value": 0.9, "on": "inner_cv"}), patients)
    y, s = np.array(patients["label"]), np.array(patients["score"])
    assert decision_metrics(y, (s >= value).astype(int))["sensitivity"] >= 0.9
    assert words == ("sensitivity >= 0.9, chosen on the arm's cross-validated out-of-fold scores (60 patients, each "
                     "scored by a fold model that did not train on it)")
    assert refit_threshold(_recipe(0.4), patients) == (0.4, "fixed at 0.4 (protocol.threshold)")


def test_fold_bundle_card_says_where_its_fold_chose():
    metrics = {"arms": {"a": {"folds": [
        {"repeat": 0, "fold": 0, "threshold": 0.41, "threshold_on": "inner_cv", "auroc": 0.8},
        {"repeat": 0, "fold": 1, "threshold": 0.52, "threshold_on": "training", "auroc": 0.7},
        {"repeat": 0, "fold": 2, "threshold": 0.5, "auroc": 0.7}]}}}
    facts = lambda fold: card_facts(metrics, "a", "scratch:tinycnn", "youden", False, fold)["threshold_rule"]  # noqa: E731
    assert facts("r0-f0") == "youden, chosen on the inner out-of-fold scores of the training part (fold r0-f0)"
    assert facts("r0-f1") == "youden, chosen on the training part's own scores (fold r0-f1)"
    assert facts("r0-f2") == "youden, chosen on the training part (fold r0-f2)"  # a run written before threshold_on


def test_bedside_card_words_of_the_fold_thresholds():
    assert fold_threshold_words({"threshold": {"rule": "youden", "value": None, "on": "inner_cv", "folds": 3}}) == (
        "youden, chosen on the out-of-fold scores of 3 patient-grouped inner folds of each training part (patients "
        "the scoring model did not train on)")
    assert fold_threshold_words({"threshold": "youden"}).startswith("youden, chosen on the training part's own scores")
    assert fold_threshold_words({}) is None and fold_threshold_words(None) is None
