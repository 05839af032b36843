"""Run directories: nothing wrong (stale or damaged folds), nothing lost (refused reruns,
concurrent writers, foreign files), clear errors when the disk says no."""

import errno
import json
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from conftest import same_numbers, small_recipe
from stagewise.study.rundir import RunError
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 1, "batch_size": 16, "lr": 3e-3}
ARMS = [{"name": "a", "backbone": "scratch:tinycnn", "stages": [PROBE]}]
QUIET = {"saliency": 0, "bootstrap": 0, "report": False}


def _recipe(manifest, arms=ARMS):
    return small_recipe(manifest, arms, protocol={"folds": 2}, evaluation=QUIET)


@pytest.fixture
def manifest(digits_manifest, tmp_path):
    """A private copy of the digits manifest (absolute image paths) that a test may edit."""
    table = pd.read_csv(digits_manifest)
    table["path"] = [str(digits_manifest.parent / p) for p in table["path"]]
    path = tmp_path / "cohort.csv"
    table.to_csv(path, index=False)
    return path


def test_changed_data_is_refused_not_mixed_with_old_folds(manifest, tmp_path):
    run = tmp_path / "run"
    first = run_study(_recipe(manifest), run)
    before = (run / "metrics.json").read_bytes()
    table = pd.read_csv(manifest)
    flip = table["patient"].isin(table["patient"].unique()[:5])
    table.loc[flip, "outcome"] = 1 - table.loc[flip, "outcome"]
    table.drop(index=range(len(table) - 6, len(table))).to_csv(manifest, index=False)
    with pytest.raises(RunError, match="the same recipe as its recipe.yaml but different data"):
        run_study(_recipe(manifest), run)
    assert (run / "metrics.json").read_bytes() == before  # the old results stay as they were
    fresh = run_study(_recipe(manifest), tmp_path / "fresh")
    assert len(fresh.predictions) != len(first.predictions)


def test_refused_rerun_leaves_the_recipe_copy_untouched(manifest, tmp_path):
    run = tmp_path / "run"
    run_study(_recipe(manifest), run)
    saved = (run / "recipe.yaml").read_bytes()
    changed = [{**ARMS[0], "stages": [{**PROBE, "lr": 1e-2}]}]
    with pytest.raises(RunError, match="different recipe") as refused:  # and other bootstrap resamples
        run_study(small_recipe(manifest, changed, protocol={"folds": 2}, evaluation={**QUIET, "bootstrap": 10}), run)
    message = " ".join(str(refused.value).split())
    # the refusal names the setting that changed, with both values; settings that do not enter the fold's
    # fingerprint (here bootstrap resamples) are not blamed
    assert "arms[a].stages.0.lr (run: 0.003, now: 0.01)" in message and "bootstrap" not in message
    assert (run / "recipe.yaml").read_bytes() == saved
    # a run made by an earlier stagewise, whose recipes lacked a setting, is named as such
    older = yaml.safe_load(saved)
    del older["arms"][0]["stages"][0]["augment_on"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(older))
    with pytest.raises(RunError, match="an earlier stagewise") as refused:
        run_study(_recipe(manifest, changed), run)
    assert "arms[a].stages.0.augment_on (run: not set, now: " in " ".join(str(refused.value).split())
    (run / "recipe.yaml").write_bytes(saved)
    assert "stopped" in (run / "log.txt").read_text()  # the log records why the run stopped


def test_second_writer_is_refused_with_the_holders_pid(manifest, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom stagewise.study.rundir import RunDir\n"
        f"d = RunDir({str(run)!r}); d.lock(); print('locked', flush=True); time.sleep(60)"
    )], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=f"PID {holder.pid}"):
            run_study(_recipe(manifest), run)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    run_study(_recipe(manifest), run)  # the lock dies with its holder


@pytest.mark.parametrize("damage", ["truncate-csv", "truncate-json", "delete-csv"])
def test_damaged_fold_is_named_and_recomputed(manifest, tmp_path, damage):
    run = tmp_path / "run"
    full = run_study(_recipe(manifest), run)
    csv, meta = run / "folds" / "a" / "r0-f1.csv", run / "folds" / "a" / "r0-f1.json"
    if damage == "truncate-csv":
        lines = csv.read_text().splitlines(keepends=True)
        csv.write_text("".join(lines[: len(lines) // 2]))
    elif damage == "truncate-json":
        meta.write_text(meta.read_text()[:40])
    else:
        csv.unlink()
    again = run_study(_recipe(manifest), run)
    pd.testing.assert_frame_equal(again.predictions, full.predictions)
    assert same_numbers(again.metrics["arms"]["a"]["folds"], full.metrics["arms"]["a"]["folds"])
    assert "damaged fold a/r0-f1" in (run / "log.txt").read_text()
    assert json.loads(meta.read_text())["n_predictions"] == len(pd.read_csv(csv))


def test_a_hand_written_recipe_in_the_output_directory_is_never_overwritten(manifest, tmp_path):
    mine = tmp_path / "recipe.yaml"
    mine.write_text("# my own notes\n")
    with pytest.raises(RunError, match="no stagewise run wrote"):
        run_study(_recipe(manifest), tmp_path)
    assert mine.read_text() == "# my own notes\n"


def test_unwritable_output_is_one_clear_error_before_training(manifest, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    t0 = time.perf_counter()
    with pytest.raises(RunError, match="cannot write into .*a-file"):
        run_study(_recipe(manifest), blocker / "run")
    assert time.perf_counter() - t0 < 5


def test_disk_full_during_a_run_names_the_path_and_reaches_the_log(manifest, tmp_path, monkeypatch):
    import stagewise.study.rundir

    real_replace = stagewise.study.rundir.os.replace

    def full_disk(src, dst):
        if str(dst).endswith(".csv") and "folds" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(stagewise.study.rundir.os, "replace", full_disk)
    with pytest.raises(RunError, match=r"cannot write .*r0-f0\.csv: No space left on device"):
        run_study(_recipe(manifest), tmp_path / "run")
    assert "No space left on device" in (tmp_path / "run" / "log.txt").read_text()
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_saliency_titles_name_manifest_rows_not_files(manifest, tmp_path, monkeypatch):
    import stagewise.study.saliency_maps as saliency

    titles = []
    real = saliency.save_overlay

    def capture(image, cam, path, title):
        titles.append(title)
        return real(image, cam, path, title)

    monkeypatch.setattr(saliency, "save_overlay", capture)
    recipe = small_recipe(manifest, [{"name": "a", "backbone": "scratch:resnet18", "stages": [PROBE]}],
                          protocol={"folds": 2}, evaluation={"saliency": 2, "bootstrap": 0, "report": True})
    run_study(recipe, tmp_path / "run")
    names = {p.rsplit("/", 1)[-1] for p in pd.read_csv(manifest)["path"]}
    assert titles and all("threshold" in t for t in titles)  # the call, p and the fold's threshold
    assert not any(n in t for t in titles for n in names)
    report = (tmp_path / "run" / "report.html").read_text()
    assert not any(n in report for n in names) and str(tmp_path) not in report


def test_recipe_differences_tell_a_users_change_from_a_newer_versions_field():
    from stagewise.study.rundir import recipe_differences

    old = {"seed": 0, "compute": {"channels_last": True}, "arms": [{"name": "a", "stages": [{"kind": "probe"}]}]}
    grown = {"seed": 0, "compute": {"channels_last": "auto"},
             "arms": [{"name": "a", "stages": [{"kind": "probe"}, {"kind": "thaw"}]}]}
    diffs, newer = recipe_differences(old, grown)
    assert diffs == ['arms[a].stages.1.kind (run: not set, now: "thaw")', 'compute.channels_last (run: true, now: "auto")']
    assert not newer  # a stage the user added
    field = {"seed": 0, "compute": {"channels_last": True}, "arms": [{"name": "a", "stages": [{"kind": "probe", "bn": "freeze"}]}]}
    assert recipe_differences(old, field) == (['arms[a].stages.0.bn (run: not set, now: "freeze")'], True)
    assert recipe_differences(old, grown, ("seed", "arms[a].")) == (['arms[a].stages.1.kind (run: not set, now: "thaw")'], False)


def test_the_settings_a_refusal_may_name_are_those_the_fold_fingerprint_hashes(manifest):
    """FINGERPRINTED (what a refused resume compares) must match what unit_fingerprint hashes:
    changing a listed setting changes a model unit's fingerprint, an unlisted one does not."""
    from stagewise.recipe import recipe_from_dict, recipe_to_dict
    from stagewise.study.rundir import FINGERPRINTED, unit_fingerprint

    base = recipe_to_dict(_recipe(manifest))

    def fingerprint(section, key, value):
        d = json.loads(json.dumps(base))
        if section is None:
            d[key] = value
        else:
            d[section][key] = value
        r = recipe_from_dict(d)
        return unit_fingerprint(r, "model", r.arms[0], 1.0, None, "digest")

    same = fingerprint(None, "seed", base["seed"])
    listed = {("seed", None, "seed", 1), ("cohort.", "cohort", "patient", "other"), ("data.", "data", "image_size", 48),
              ("protocol.", "protocol", "folds", 3), ("compute.device", "compute", "device", "cuda"),
              ("compute.precision", "compute", "precision", "bf16"), ("compute.channels_last", "compute", "channels_last", True),
              ("evaluation.recalibrate", "evaluation", "recalibrate", "slope")}
    assert {k for k, *_ in listed} == set(FINGERPRINTED)
    for _, section, key, value in listed:
        assert fingerprint(section, key, value) != same, key
    for section, key, value in (("evaluation", "bootstrap", 7), ("evaluation", "saliency", 3), ("compute", "threads", 1),
                                (None, "name", "renamed"), ("protocol", "label_fractions", [1.0, 0.5])):
        assert fingerprint(section, key, value) == same, key
