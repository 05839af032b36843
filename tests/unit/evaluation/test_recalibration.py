"""In-study logistic recalibration (evaluation.recalibrate): fitted per fold on its training
patients only, applied to its test patients, shown beside the raw curves; AUROC unchanged."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import small_recipe
from stagewise.evaluation import fold_scores as scoring
from stagewise.evaluation.calibration import apply_recalibration, fit_recalibration
from stagewise.evaluation.recalibration import fold_recalibration
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 3, "batch_size": 16, "lr": 3e-3}
MIXED = {"kind": "thaw", "epochs": 2, "batch_size": 16, "unfreeze": {"layer4": 0.0}, "lr": 1e-3, "cutmix": {"alpha": 1.0}}


def test_fold_fit_is_fit_recalibration_and_never_reverses_the_ranking():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.clip(0.5 + 0.1 * (y - 0.5) + 0.05 * rng.normal(size=200), 0.01, 0.99)  # pulled to the middle
    fit = fold_recalibration(y, s, "slope")
    assert (fit["intercept"], fit["slope"]) == fit_recalibration(y, s, slope=True)
    assert fit["slope"] > 1 and fit["n_train_patients"] == 200 and fit["n_train_positive"] == int(y.sum())
    assert fold_recalibration(y, s, "intercept")["slope"] == 1.0
    reversed_ = fold_recalibration(y, 1 - s, "slope")  # a fitted slope < 0: intercept only
    assert reversed_["slope"] == 1.0 and "fallback" in reversed_
    assert "error" in fold_recalibration(np.ones(5), s[:5], "slope")


@pytest.fixture(scope="module")
def study(digits_manifest, tmp_path_factory):
    """A CutMix arm with `evaluation.recalibrate: slope`; what each fold's fit was given is kept."""
    seen = []
    original = scoring.fold_recalibration

    def spy(y_train, s_train, method):
        seen.append((np.array(y_train), np.array(s_train), method))
        return original(y_train, s_train, method)

    mp = pytest.MonkeyPatch()
    mp.setattr(scoring, "fold_recalibration", spy)
    out = tmp_path_factory.mktemp("recalibration") / "run"
    recipe = small_recipe(digits_manifest, [{"name": "mix", "backbone": "scratch:resnet18", "stages": [PROBE, MIXED]}],
                          evaluation={"recalibrate": "slope", "bootstrap": 0, "saliency": 0})
    try:
        result = run_study(recipe, out)
    finally:
        mp.undo()
    return out, result, seen


def test_each_fold_is_fitted_on_its_training_patients_only(study):
    out, result, seen = study
    folds = json.loads((out / "metrics.json").read_text())["arms"]["mix"]["folds"]
    patients = result.metrics["cohort"]["patients"]
    assert len(seen) == len(folds) == 3
    for fold, (y, s, method) in zip(folds, seen):
        fit = fold["recalibration"]
        assert method == fit["method"] == "slope"
        assert len(y) == fit["n_train_patients"] == fold["n_train_patients"] == patients - fold["n_test_patients"]
        expected = fit_recalibration(y, s, slope=True)
        if expected[1] <= 0:  # a reversed ranking on the training part: intercept only
            expected = fit_recalibration(y, s, slope=False)
        assert (fit["intercept"], fit["slope"]) == pytest.approx(expected, abs=1e-12)


def test_each_fold_auroc_is_unchanged_and_the_recalibrated_figures_exist(study):
    out, result, _ = study
    folds = {(f["repeat"], f["fold"]): f for f in result.metrics["arms"]["mix"]["folds"]}
    preds = pd.read_csv(out / "predictions.csv")
    for (repeat, k), f in folds.items():
        part = preds[(preds["repeat"] == repeat) & (preds["fold"] == k)].groupby("patient").agg(y=("y", "first"),
                                                                                               s=("prob", "mean"))
        mapped = apply_recalibration(part["s"], f["recalibration"]["intercept"], f["recalibration"]["slope"])
        assert roc_auc_score(part["y"], mapped) == pytest.approx(roc_auc_score(part["y"], part["s"]), abs=1e-12)
        assert roc_auc_score(part["y"], part["s"]) == pytest.approx(f["auroc"], abs=1e-12)
    fixed = result.metrics["evidence"]["sampling"]["mix"]["recalibrated"]
    assert fixed["method"] == "slope" and fixed["fitted_on"] == "each fold's training patients"
    assert fixed["calibration"]["slope"] > 0 and fixed["calibration_curve"]["prob_pred"]
    assert fixed["decision_curve"]["net_benefit_model"] and len(fixed["folds"]) == 3
    raw = result.metrics["evidence"]["units"]["mix"]
    assert fixed["pooled_auroc_raw"] == pytest.approx(raw["auroc_delong_ci"]["point"], abs=1e-12)
    assert fixed["calibration"] != raw["calibration"]


def test_the_report_shows_them_beside_the_raw_ones_and_the_log_reads(study):
    out, _, _ = study
    html = (out / "report.html").read_text()
    for needle in ('id="fig-calibration"', 'id="fig-calibration-recalibrated"', 'id="fig-decision-recalibrated"',
                   'data-corrected="recalibrated"', "mix (recalibrated in-study)", "fitted on each fold&#39;s training"):
        assert needle in html, needle
    log = (out / "log.txt").read_text()
    assert "mix r0-f0: AUROC " in log and "balanced accuracy " in log and "{'" not in log
