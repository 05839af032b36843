"""Threshold rules (evaluation/thresholds.py): each rule does what its name says on the scores it
is chosen on, and on a cohort a model memorises, a threshold chosen on inner out-of-fold scores
decides test patients better than one chosen on the model's own training scores."""

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from stagewise.evaluation.metrics import decision_metrics
from stagewise.evaluation.thresholds import inner_oof_scores, threshold_for, threshold_unreliable


def _scores(seed: int, n: int = 200, prevalence: float = 0.3):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    return y, rng.normal(size=n) + 1.2 * y


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_target_sensitivity_and_specificity_are_reached_on_the_scores_they_were_chosen_on(target, seed):
    y, s = _scores(seed)
    t = threshold_for(y, s, {"rule": "sensitivity", "value": min(target, 0.999)})
    assert decision_metrics(y, (s >= t).astype(int))["sensitivity"] >= min(target, 0.999)
    # the highest such cut-off: one step up misses the target (the fewest false positives)
    above = s[s > t]
    if len(above):
        assert decision_metrics(y, (s >= above.min()).astype(int))["sensitivity"] < min(target, 0.999)
    t = threshold_for(y, s, {"rule": "specificity", "value": min(target, 0.999)})
    assert decision_metrics(y, (s >= t).astype(int))["specificity"] >= min(target, 0.999)


def test_net_benefit_rule_maximises_net_benefit_at_its_risk_threshold():
    y, s = _scores(0)
    p = 1 / (1 + np.exp(-s))
    pt = 0.3

    def benefit(cut):
        d = decision_metrics(y, (p >= cut).astype(int))
        return (d["tp"] - d["fp"] * pt / (1 - pt)) / len(y)

    t = threshold_for(y, p, {"rule": "net_benefit", "value": pt})
    assert benefit(t) >= max(benefit(c) for c in np.unique(p)) - 1e-12


def test_youden_fixed_prevalence_and_one_class():
    y, s = _scores(1)
    t = threshold_for(y, s, "youden")
    j = lambda c: sum(decision_metrics(y, (s >= c).astype(int))[k] for k in ("sensitivity", "specificity"))  # noqa: E731
    assert j(t) >= max(j(c) for c in np.unique(s)) - 1e-12
    assert threshold_for(y, s, 0.37) == 0.37 and threshold_for(y, s, {"fixed": 0.2}) == 0.2
    assert np.mean(s >= threshold_for(y, s, "prevalence")) == pytest.approx(np.mean(y), abs=0.01)
    assert threshold_for(np.zeros(5, int), np.arange(5.0), "youden") == 0.5


def test_unreliable_only_when_chosen_on_training_scores_that_separate():
    assert threshold_unreliable("youden", 1.0) and threshold_unreliable("youden", 0.99)
    assert not threshold_unreliable("youden", 0.98)
    assert not threshold_unreliable({"rule": "youden", "on": "inner_cv"}, 1.0)
    assert not threshold_unreliable(0.5, 1.0) and not threshold_unreliable("youden", float("nan"))


def _cohort(seed: int, n: int):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    x = rng.normal(size=(n, 5))
    x[:, 0] += y
    return x, y


def test_inner_cv_threshold_beats_the_training_one_where_the_model_memorises():
    """A random forest scores its own training rows almost perfectly apart (training AUROC 1):
    Youden on those scores sits in the gap, far from where test patients fall; on inner
    out-of-fold scores it does not. Over 8 seeds the inner-CV threshold differs every time and
    its test balanced accuracy is higher on average by at least 0.04, and in at least 6 seeds."""
    gains = []
    for seed in range(8):
        x, y = _cohort(seed, 150)
        x_test, y_test = _cohort(100 + seed, 400)
        rows = np.arange(len(y))

        def fit_predict(fit, score, xs=None):
            forest = RandomForestClassifier(50, random_state=seed).fit(x[fit], y[fit])
            return forest.predict_proba(x[score] if xs is None else xs)[:, 1]

        s_train, s_test = fit_predict(rows, rows), fit_predict(rows, None, x_test)
        oof = inner_oof_scores(rows, y, rows, 3, seed, fit_predict)[:, 0]
        assert not np.isnan(oof).any()
        t_training = threshold_for(y, s_train, "youden")
        t_inner = threshold_for(y, oof, {"rule": "youden", "on": "inner_cv"})
        assert threshold_unreliable("youden", roc_auc_score(y, s_train))  # the training scores separate
        assert t_inner != t_training
        gains.append(balanced_accuracy_score(y_test, s_test >= t_inner) - balanced_accuracy_score(y_test, s_test >= t_training))
    assert np.mean(gains) >= 0.04, gains
    assert sum(g > 0 for g in gains) >= 6, gains


def test_inner_scores_come_from_models_that_never_saw_the_patient():
    patients = np.repeat(np.arange(30), 2)
    y = (patients % 3 == 0).astype(int)
    train = np.arange(10, 60)  # cohort rows of an outer training part
    seen = []

    def fit_predict(fit, score):
        seen.append((set(patients[fit]), set(patients[score])))
        return np.full(len(score), float(len(seen)))

    oof = inner_oof_scores(train, y, patients, 3, 0, fit_predict)
    assert len(seen) == 3 and not np.isnan(oof).any()
    assert all(not (a & b) for a, b in seen)  # grouped by patient
    assert set().union(*(b for _, b in seen)) == set(patients[train])
