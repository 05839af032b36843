"""A study's thresholds: each fold records its threshold, rule, where it was chosen and its
training AUROC; a rule chosen on training scores that separate perfectly is said in log.txt,
once on screen and in the report beside the threshold-based figures; `on: inner_cv` chooses on
inner out-of-fold scores (reusing a tuned arm's inner fits) and then says nothing of the kind."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import small_recipe
from stagewise.evaluation.thresholds import UNRELIABLE_SENTENCE
from stagewise.study import run_study
from stagewise.study.fitting import SilentReporter

PROBE = {"kind": "probe", "epochs": 1, "batch_size": 16, "lr": 3e-3}


class Said(SilentReporter):
    def __init__(self):
        self.lines = []

    def message(self, text):
        self.lines.append(text)


@pytest.fixture(scope="module")
def perfect_manifest(digits_manifest):
    """The digits cohort with a baseline column that separates the outcome perfectly: its
    training AUROC is 1 in every fold."""
    table = pd.read_csv(digits_manifest)
    table["perfect"] = table["outcome"] * 2.0 + np.linspace(0, 0.5, len(table))
    path = digits_manifest.with_name("perfect.csv")
    table.to_csv(path, index=False)
    return path


def _recipe(manifest, threshold, arms=None):
    return small_recipe(manifest, arms or [{"name": "probe", "backbone": "scratch:tinycnn", "stages": [PROBE]}],
                        cohort={"manifest": str(manifest), "baselines": ["perfect"]},
                        protocol={"folds": 3, "threshold": threshold}, evaluation={"saliency": 0, "bootstrap": 0})


def test_training_scores_that_separate_are_said_in_log_screen_and_report(perfect_manifest, tmp_path):
    said = Said()
    result = run_study(_recipe(perfect_manifest, "youden"), tmp_path / "run", reporter=said)
    folds = result.metrics["arms"]["baseline:perfect"]["folds"]
    assert all(f["train_auroc"] == 1.0 and f["threshold_unreliable"] for f in folds)
    assert all(f["threshold_on"] == "training" and f["threshold_rule"] == "youden" for f in folds)
    assert [line for line in said.lines if UNRELIABLE_SENTENCE in line] == [
        f"baseline:perfect: {UNRELIABLE_SENTENCE}"]  # once on screen, for the run
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count(UNRELIABLE_SENTENCE) == len(folds) + 1  # each fold, and the run's summary line
    html = (tmp_path / "run" / "report.html").read_text()
    assert 'id="threshold-unreliable"' in html and "baseline:perfect: thresholds chosen on training scores" in html
    assert "chosen on the training part&#39;s own scores" in html or "chosen on the training part's own scores" in html


def test_inner_cv_thresholds_are_chosen_on_inner_scores_and_recorded(perfect_manifest, tmp_path):
    tuned = {"name": "tuned", "backbone": "scratch:tinycnn", "stages": [PROBE],
             "tune": {"grid": {"stages.0.lr": [1e-3, 3e-3]}, "inner_folds": 3}}
    plain = {"name": "probe", "backbone": "scratch:tinycnn", "stages": [PROBE]}
    said = Said()
    result = run_study(_recipe(perfect_manifest, {"rule": "youden", "on": "inner_cv", "folds": 3}, [tuned, plain]),
                       tmp_path / "run", reporter=said)
    arms = result.metrics["arms"]
    for name in ("tuned", "probe", "baseline:perfect"):
        for f in arms[name]["folds"]:
            assert f["threshold_on"] == "inner_cv" and not f["threshold_unreliable"]
            assert np.isfinite(f["inner_auroc"]) and np.isfinite(f["train_auroc"]) and 0 <= f["threshold"] <= 3
    record = json.loads((tmp_path / "run" / "folds" / "tuned" / "r0-f0.json").read_text())["threshold_inner"]
    assert record == {"folds": 3, "seconds": 0.0, "reused_tuning_fits": True}  # the grid search's fits, reused
    record = json.loads((tmp_path / "run" / "folds" / "probe" / "r0-f0.json").read_text())["threshold_inner"]
    assert record["folds"] == 3 and record["seconds"] > 0 and record["reused_tuning_fits"] is False
    assert not any(UNRELIABLE_SENTENCE in line for line in said.lines)
    assert UNRELIABLE_SENTENCE not in (tmp_path / "run" / "log.txt").read_text()
    html = (tmp_path / "run" / "report.html").read_text()
    assert "chosen on the out-of-fold scores of 3 patient-grouped inner folds of each training part" in html
    assert 'id="threshold-unreliable"' not in html


def test_inner_folds_a_training_part_cannot_hold_are_refused_before_anything_runs(perfect_manifest, tmp_path):
    from stagewise.data import load_cohort
    from stagewise.study.preflight import split_problems

    recipe = _recipe(perfect_manifest, {"rule": "youden", "on": "inner_cv", "folds": 20})
    problems = split_problems(recipe, load_cohort(recipe.cohort))
    assert len(problems) == 1 and problems[0].startswith("protocol.threshold.folds (20 inner folds) inside fold r0-f0")
    assert "lower protocol.threshold.folds or choose the threshold `on: training`" in problems[0]
    assert split_problems(_recipe(perfect_manifest, {"rule": "youden", "folds": 20}), load_cohort(recipe.cohort)) == []
