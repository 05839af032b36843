"""`validate` and `run` check everything before training, and report all problems at once."""

import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import small_recipe
from stagewise.study.preflight import StudyCheckError, check_study
from stagewise.cli import app
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 1, "batch_size": 16}


@pytest.fixture
def broken(digits_manifest, tmp_path):
    """A cohort with a zero-byte image, and a recipe whose second arm names a group its
    backbone lacks, with more folds than the minority class has patients."""
    table = pd.read_csv(digits_manifest)
    table["path"] = [str(digits_manifest.parent / p) for p in table["path"]]
    (tmp_path / "empty.png").write_bytes(b"")
    table.loc[3, "path"] = str(tmp_path / "empty.png")
    positives = table[table["outcome"] == 1]["patient"].unique()[:3]
    table = table[(table["outcome"] == 0) | table["patient"].isin(positives)]
    table.to_csv(tmp_path / "m.csv", index=False)
    arms = [{"name": "fine", "backbone": "scratch:tinycnn", "stages": [PROBE]},
            {"name": "bad", "backbone": "scratch:tinycnn",
             "stages": [PROBE, {"kind": "thaw", "unfreeze": {"layer4": 0.0}}]}]
    return small_recipe(tmp_path / "m.csv", arms, protocol={"folds": 5}), tmp_path


def test_every_problem_is_reported_at_once_before_training(broken):
    recipe, tmp_path = broken
    with pytest.raises(StudyCheckError) as err:
        check_study(recipe)
    text = str(err.value)
    assert "row 5" in text and "empty" in text                       # the zero-byte image, by CSV line
    assert "arm 'bad', stage 1 (thaw)" in text and "layer4" in text   # a group tinycnn does not have
    t0 = time.perf_counter()
    with pytest.raises(StudyCheckError):
        run_study(recipe, tmp_path / "run")  # refused before the first arm trains a single fold
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "run" / "folds" / "fine").exists()


def test_folds_larger_than_the_minority_class_are_caught(digits_manifest, tmp_path):
    table = pd.read_csv(digits_manifest)
    table["path"] = [str(digits_manifest.parent / p) for p in table["path"]]
    keep = table[table["outcome"] == 1]["patient"].unique()[:3]
    table[(table["outcome"] == 0) | table["patient"].isin(keep)].to_csv(tmp_path / "m.csv", index=False)
    recipe = small_recipe(tmp_path / "m.csv", [{"name": "a", "backbone": "scratch:tinycnn", "stages": [PROBE]}],
                          protocol={"folds": 5})
    with pytest.raises(StudyCheckError, match="protocol: .*folds"):
        check_study(recipe)


def test_validate_cli_checks_what_run_would_run(digits_manifest, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: v\ncohort: {{manifest: {digits_manifest}}}\ndata: {{image_size: 32}}\n"
        "arms:\n  - {name: a, backbone: 'scratch:tinycnn', stages: [{kind: thaw, unfreeze: {block3: 0.0}}]}\n"
    )
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(recipe)])
    assert ok.exit_code == 0 and "valid" in ok.output and "patients" in ok.output
    bad = runner.invoke(app, ["validate", str(recipe), "--set", "arms.0.stages.0.unfreeze={layer4: 0.0}"])
    assert bad.exit_code == 2 and "layer4" in bad.output and "Traceback" not in bad.output
