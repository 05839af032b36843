"""Whole studies: grouped folds, honest chance-level scores, resume, repeatability, CLI errors."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import StopAfter, small_recipe
from stagewise.cli import app
from stagewise.evaluation.splits import SplitError, make_splits
from stagewise.recipe import ProtocolConfig
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 3, "batch_size": 16, "lr": 3e-3}
THAW = {"kind": "thaw", "epochs": 2, "batch_size": 16, "unfreeze": {"layer4": 0.0}, "lr": 1e-3}


@pytest.mark.parametrize("test_images", ["all", "first"])
def test_no_patient_is_on_both_sides_of_any_fold(test_images):
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(60), rng.integers(1, 5, 60))
    y = (patients % 3 == 0).astype(int)
    protocol = ProtocolConfig(folds=5, repeats=4, test_images=test_images)
    splits = make_splits(y, patients, protocol, seed=0)
    assert len(splits) == 20
    for r in range(4):
        folds = [s for s in splits if s.repeat == r]
        tested = np.concatenate([patients[s.test] for s in folds])
        assert sorted(set(tested)) == list(range(60))  # every patient tested once per repeat
        for s in folds:
            assert not set(patients[s.train]) & set(patients[s.test])
            train_patients = set(patients[s.train])
            assert all((patients == p).sum() == (patients[s.train] == p).sum() for p in train_patients)
            if test_images == "first":
                assert len(s.test) == len(set(patients[s.test]))
    assert not np.array_equal(splits[0].test, splits[5].test)  # repeats differ


def test_too_few_patients_per_class_is_a_clear_error():
    with pytest.raises(SplitError, match="Lower protocol.folds"):
        make_splits(np.array([0, 0, 0, 1, 1]), np.arange(5), ProtocolConfig(folds=3), seed=0)


def test_permuted_outcomes_score_chance_auroc(digits_manifest, tmp_path):
    table = pd.read_csv(digits_manifest)
    labels = table.groupby("patient")["outcome"].first()
    shuffled = pd.Series(np.random.default_rng(1).permutation(labels.to_numpy()), index=labels.index)
    table["outcome"] = table["patient"].map(shuffled)
    permuted = digits_manifest.with_name("permuted.csv")
    table.to_csv(permuted, index=False)
    recipe = small_recipe(permuted, [{"name": "probe", "backbone": "scratch:resnet18", "stages": [PROBE]}],
                          protocol={"folds": 4, "repeats": 3})
    result = run_study(recipe, tmp_path / "run")
    auroc = result.metrics["arms"]["probe"]["summary"]["auroc"]["mean"]
    assert abs(auroc - 0.5) < 0.1


TWO_ARMS = [{"name": "probe", "backbone": "scratch:resnet18", "stages": [PROBE]},
            {"name": "probe-thaw", "backbone": "scratch:resnet18", "stages": [PROBE, THAW]}]


@pytest.fixture(scope="module")
def two_arm_study(digits_manifest, tmp_path_factory):
    """One uninterrupted two-arm study (6 folds), read by several tests."""
    recipe = small_recipe(digits_manifest, TWO_ARMS)
    return recipe, run_study(recipe, tmp_path_factory.mktemp("two-arm") / "run")


def test_real_signal_scores_well_and_outputs_are_complete(two_arm_study):
    _, result = two_arm_study
    run = result.run_dir
    for arm in ("probe", "probe-thaw"):
        assert result.metrics["arms"][arm]["summary"]["auroc"]["mean"] > 0.8
    preds = pd.read_csv(run / "predictions.csv")
    # every image is predicted once per arm and repeat, with its patient, fold and arm
    assert set(preds.columns) >= {"arm", "repeat", "fold", "image", "patient", "y", "prob"}
    assert preds.groupby("arm")["image"].nunique().tolist() == [80, 80]
    # both arms ran on identical folds
    folds = preds.pivot_table(index="image", columns="arm", values="fold")
    assert (folds["probe"] == folds["probe-thaw"]).all()
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["arms"]["probe"]["folds"]) == 3
    for name in ("recipe.yaml", "environment.json", "log.txt"):
        assert (run / name).is_file()


def test_interrupted_study_resumes_and_matches_an_uninterrupted_one(two_arm_study, tmp_path):
    recipe, full = two_arm_study  # the same recipe, run without interruption

    with pytest.raises(KeyboardInterrupt):
        run_study(recipe, tmp_path / "resumed", StopAfter(4))
    counter = StopAfter(10**6)
    resumed = run_study(recipe, tmp_path / "resumed", counter)
    assert counter.started == 2  # 6 folds in all, 4 finished before the interruption
    for arm in ("probe", "probe-thaw"):  # the numbers match; timings and memory of course do not
        for key in ("summary", "folds"):
            assert resumed.metrics["arms"][arm][key] == full.metrics["arms"][arm][key]
    # exactly: predictions read back from the fold files round-trip every float
    assert json.dumps(resumed.metrics["evidence"], sort_keys=True) == json.dumps(full.metrics["evidence"], sort_keys=True)
    pd.testing.assert_frame_equal(resumed.predictions, full.predictions, check_exact=True)


def test_changed_recipe_does_not_mix_into_an_old_run(digits_manifest, tmp_path):
    from stagewise.study.rundir import RunError

    arms = [{"name": "a", "backbone": "scratch:resnet18", "stages": [PROBE]}]
    run_study(small_recipe(digits_manifest, arms, protocol={"folds": 2}), tmp_path / "run")
    changed = [{"name": "a", "backbone": "scratch:resnet18", "stages": [{**PROBE, "lr": 1e-2}]}]
    with pytest.raises(RunError, match="different recipe"):
        run_study(small_recipe(digits_manifest, changed, protocol={"folds": 2}), tmp_path / "run")


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    runner = CliRunner()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,outcome,patient\nmissing.png,1,p1\nalso_missing.png,maybe,p2\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: bad\ncohort: {manifest: m.csv}\narms:\n  - name: a\n    backbone: scratch:resnet18\n"
        "    stages: [{kind: probe}]\n"
    )
    result = runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    text = result.output
    assert "Traceback" not in text
    assert "missing.png" in text and "also_missing.png" in text and "maybe" in text and "row 3" in text

    recipe.write_text("name: bad\ncohort: {manifest: m.csv}\narms:\n  - name: a\n    backbone: resnet18\n    stages: [{kind: probe, epoch: 3}]\n")
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "arms.0.backbone" in result.output and "arms.0.stages.0.epoch" in result.output
