"""Class-balanced sampling shifts predicted risks; the prior-shift correction moves them back,
and the report says so beside the raw curves."""

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit

from conftest import small_recipe
from stagewise.evaluation.calibration import calibration_slope_intercept
from stagewise.evaluation.evidence import sampling_evidence
from stagewise.evaluation.prior_shift import prior_shift
from stagewise.report.wording import corrected_calibration_rows, sampling_notes

PROBE = {"kind": "probe", "epochs": 1}


def test_prior_shift_undoes_a_balanced_prior_exactly():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0.4, 1.5, 500)
    prevalence = 0.6
    at_half = expit(true_logit - logit(prevalence))  # what a Bayes model trained at prevalence 0.5 outputs
    assert prior_shift(at_half, prevalence) == pytest.approx(expit(true_logit), abs=1e-9)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        prior_shift(at_half, 1.0)


def _balanced_study():
    """One arm trained with balanced sampling whose outputs are risks at prevalence 0.5, on a
    cohort with 70 % positive images; folds record their training prevalence."""
    rng = np.random.default_rng(1)
    n = 2000
    true_logit = 1.1 + 1.5 * rng.normal(size=n)  # calibrated risks, about 70 % positive
    y = (rng.random(n) < expit(true_logit)).astype(int)
    prob = expit(true_logit - logit(y.mean()))  # the same model trained at prevalence 0.5
    fold = np.arange(n) % 4
    preds = pd.DataFrame({"arm": "balanced", "repeat": 0, "fold": fold, "patient": np.arange(n), "y": y, "prob": prob})
    folds = [{"repeat": 0, "fold": k, "threshold": 0.5, "train_prevalence_images": float(y[fold != k].mean())}
             for k in range(4)]
    metrics = {"cohort": {"images": n, "positive_images": int(y.sum())},
               "arms": {"balanced": {"kind": "model", "base_arm": "balanced", "folds": folds},
                        "mixed": {"kind": "model", "base_arm": "mixed", "folds": folds}}}
    arms = [{"name": "balanced", "backbone": "scratch:tinycnn", "stages": [{**PROBE, "balanced_sampling": True}]},
            {"name": "mixed", "backbone": "scratch:tinycnn", "stages": [{**PROBE, "cutmix": {"alpha": 1.0}}]}]
    return small_recipe("cohort.csv", arms), metrics, preds, y, prob


def test_evidence_reports_the_corrected_calibration_beside_the_raw_and_the_report_says_why():
    recipe, metrics, preds, y, prob = _balanced_study()
    sampling = sampling_evidence(recipe, metrics, preds)
    assert sampling["balanced"]["balanced_sampling_stages"] == [1] and sampling["balanced"]["final_balanced"]
    assert sampling["mixed"]["mixing_stages"] == ["1 (CutMix)"] and "prior_shift" not in sampling["mixed"]
    raw = calibration_slope_intercept(y, prob)["intercept"]
    fixed = sampling["balanced"]["prior_shift"]
    assert fixed["train_prevalence"] == "fold"
    assert raw > 0.35 and abs(fixed["calibration"]["intercept"]) < 0.15  # risks too low on average, then not
    assert raw - fixed["calibration"]["intercept"] == pytest.approx(logit(y.mean()), abs=0.05)
    assert fixed["decision_curve"]["net_benefit_model"] and fixed["calibration_curve"]["prob_pred"]
    notes = {n["unit"]: n for n in sampling_notes(sampling, ["balanced", "mixed"])}
    assert "class-balanced sampling (stage 1)" in notes["balanced"]["text"]
    assert "prior-shift corrected" in notes["balanced"]["fix"] and "each fold's training prevalence" in notes["balanced"]["fix"]
    assert "CutMix" in notes["mixed"]["text"] and "stagewise evaluate --recalibrate" in notes["mixed"]["fix"]
    rows = corrected_calibration_rows(sampling, ["balanced", "mixed"])
    assert [r["name"] for r in rows] == ["balanced (prior-shift corrected)"]
    # folds written before the prevalence was recorded: the cohort's image prevalence, and said so
    for f in metrics["arms"]["balanced"]["folds"]:
        del f["train_prevalence_images"]
    assert sampling_evidence(recipe, metrics, preds)["balanced"]["prior_shift"]["train_prevalence"] == "cohort"
