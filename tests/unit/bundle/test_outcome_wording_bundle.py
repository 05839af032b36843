"""The outcome's wording reaches everything a person reads: bundle.json (per task), the model
card, the study report. Unset, the column name is used as before; set on a finished run, the
run resumes every fold (the wording is no computation) and its report and bundles say it."""

import json

import pytest
import yaml

from conftest import small_recipe
from stagewise.bundle import export_bundle
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 1, "batch_size": 16, "lr": 1e-2}
ARMS = [{"name": "net", "backbone": "scratch:tinycnn", "stages": [PROBE]}]
LABEL, HORIZON = "admission to intensive care", "within 30 days of the radiograph"
PHRASE = f"{LABEL} {HORIZON}"


def _recipe(manifest, **cohort):
    return small_recipe(manifest, ARMS, cohort={"manifest": str(manifest), **cohort}, protocol={"folds": 2},
                        compute={"save_models": True}, evaluation={"saliency": 0, "bootstrap": 0})


def _folds(run):
    return {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in sorted((run / "folds").rglob("*.json"))}


@pytest.fixture(scope="module")
def runs(digits_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("wording")
    run = root / "run"
    run_study(_recipe(digits_manifest), run)
    plain_report = (run / "report.html").read_text()
    plain = export_bundle(run, "net", root / "plain", fold="r0-f0")
    folds = _folds(run)
    run_study(_recipe(digits_manifest, outcome_label=LABEL, outcome_horizon=HORIZON), run)  # the same run, worded
    return {"run": run, "plain": plain, "plain_report": plain_report, "folds_before": folds,
            "worded": export_bundle(run, "net", root / "worded", fold="r0-f0")}


def test_wording_a_finished_run_resumes_every_fold(runs):
    assert _folds(runs["run"]) == runs["folds_before"]  # neither recomputed nor rewritten
    assert yaml.safe_load((runs["run"] / "recipe.yaml").read_text())["cohort"]["outcome_label"] == LABEL


def test_bundle_json_carries_the_wording_per_task(runs):
    task = json.loads((runs["worded"] / "bundle.json").read_text())["tasks"][0]
    assert (task["outcome"], task["outcome_label"], task["outcome_horizon"]) == ("outcome", LABEL, HORIZON)
    plain = json.loads((runs["plain"] / "bundle.json").read_text())["tasks"][0]
    assert plain["outcome_label"] is None and plain["outcome_horizon"] is None
    shared = yaml.safe_load((runs["worded"] / "recipe.yaml").read_text())["cohort"]
    assert (shared["outcome_label"], shared["outcome_horizon"]) == (LABEL, HORIZON)


def test_model_card_names_the_outcome_in_words_and_its_column(runs):
    card = (runs["worded"] / "MODEL_CARD.md").read_text()
    assert f"probability of {PHRASE} (column outcome);" in card
    plain = (runs["plain"] / "MODEL_CARD.md").read_text()
    assert "probability of outcome; decision threshold" in plain and LABEL not in plain


def test_report_names_the_outcome_in_words(runs):
    report = (runs["run"] / "report.html").read_text()
    assert f"Outcome: <b>{PHRASE} (column outcome)</b>" in report
    assert "Outcome: <b>outcome</b>" in runs["plain_report"] and LABEL not in runs["plain_report"]


def test_predict_on_a_missing_file_says_so_without_a_manifest(runs, tmp_path):
    """(Reuses this module's bundle.) predict takes files, not a manifest: the reason names none."""
    from typer.testing import CliRunner

    from stagewise.cli import app

    result = CliRunner().invoke(app, ["predict", str(runs["plain"]), str(tmp_path / "gone.png")])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "gone.png: no such file" in text
    assert "manifest" not in text
