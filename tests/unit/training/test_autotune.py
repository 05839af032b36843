"""compute: auto chooses precision and layout by timing training steps, within its guard."""

import io
import json
import math

import pytest

from stagewise.models import build_arch
from stagewise.recipe import ComputeConfig
from stagewise.training import autotune
from stagewise.training.autotune import candidates, choose_compute, pick


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGEWISE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "compute-choices.json"


def _labels(cfg):
    return [c.label for c in candidates(cfg)]


def test_candidates_are_what_the_recipe_leaves_open_and_bf16_only_where_native(monkeypatch):
    assert _labels(ComputeConfig(device="cpu", precision="fp32", channels_last=False)) == ["cpu fp32"]
    monkeypatch.setattr(autotune, "cpu_has_fast_bf16", lambda: False)
    assert _labels(ComputeConfig(device="cpu")) == ["cpu fp32", "cpu fp32 channels_last"]
    monkeypatch.setattr(autotune, "cpu_has_fast_bf16", lambda: True)
    assert _labels(ComputeConfig(device="cpu")) == ["cpu fp32", "cpu fp32 channels_last", "cpu bf16",
                                                    "cpu bf16 channels_last"]
    assert _labels(ComputeConfig(device="cpu", precision="bf16")) == ["cpu bf16", "cpu bf16 channels_last"]
    assert _labels(ComputeConfig(device="cpu", channels_last=True)) == ["cpu fp32 channels_last", "cpu bf16 channels_last"]


def test_pick_keeps_the_most_exact_setting_unless_another_is_clearly_faster():
    opts = candidates(ComputeConfig(device="cpu", precision="fp32"))  # fp32, fp32 channels_last
    a, b = (c.label for c in opts)
    assert pick(opts, {a: 1.0, b: 0.97}).label == a  # 3 % is within the margin
    assert pick(opts, {a: 1.0, b: 0.80}).label == b
    assert pick(opts, {a: math.inf, b: 2.0}).label == b  # a non-finite loss drops fp32 too
    assert pick(opts, {a: 0.5, b: math.inf}).label == a


def test_explicit_settings_are_never_measured(cache):
    compute, record = choose_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False),
                                     build_arch("scratch:tinycnn"), 32, 8)
    assert compute.label == "cpu fp32" and record["measured"] is False and not cache.exists()


def test_choice_is_measured_once_then_read_from_the_cache(cache, monkeypatch):
    cfg = ComputeConfig(device="cpu", precision="fp32")  # channels_last: auto -> two candidates
    backbone = build_arch("scratch:tinycnn")
    compute, first = choose_compute(cfg, backbone, 32, 8)
    assert first["cached"] is False and set(first["seconds_per_step"]) == {"cpu fp32", "cpu fp32 channels_last"}
    assert all(0 < s < 60 for s in first["seconds_per_step"].values())
    assert compute.label == first["chosen"] and first["precision"] == "fp32"
    assert json.loads(cache.read_text())  # one entry on disk

    def no_timing(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(autotune, "time_steps", no_timing)
    again, second = choose_compute(cfg, backbone, 32, 8)
    assert second["cached"] is True and again.label == compute.label
    assert second["seconds_per_step"] == first["seconds_per_step"]
    with pytest.raises(AssertionError, match="measured again"):  # another image size is another entry
        choose_compute(cfg, backbone, 48, 8)


def test_a_damaged_cache_is_measured_again_and_rewritten(cache, caplog):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    _, record = choose_compute(ComputeConfig(device="cpu", precision="fp32"), build_arch("scratch:tinycnn"), 32, 4)
    assert record["cached"] is False and "unreadable" in caplog.text
    assert len(json.loads(cache.read_text())) == 1


def test_a_study_with_compute_auto_records_the_choice(digits_manifest, tmp_path, cache):
    from conftest import small_recipe

    from stagewise.study import run_study

    arms = [{"name": "probe", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1}]}]
    recipe = small_recipe(digits_manifest, arms, compute={"precision": "fp32", "channels_last": "auto"},
                          protocol={"folds": 2})
    result = run_study(recipe, tmp_path / "run")
    env = json.loads((result.run_dir / "environment.json").read_text())
    choice = env["compute_choice"]["probe"]
    assert choice["chosen"] == result.metrics["compute"] and set(choice["seconds_per_step"]) == {
        "cpu fp32", "cpu fp32 channels_last"}
    fold = json.loads(next((result.run_dir / "folds").rglob("r0-f0.json")).read_text())
    assert fold["compute"] == choice["chosen"]
    html = (result.run_dir / "report.html").read_text()
    assert 'id="compute-choice"' in html and "per training step" in html


def test_a_busy_machine_is_named_before_training_with_the_thread_setting_to_change(digits_manifest, tmp_path,
                                                                                   monkeypatch, caplog):
    from conftest import small_recipe

    from stagewise.study import run_study
    from stagewise.training.compute import busy_machine_note

    assert busy_machine_note(2, load=0.4, cpus=2) is None  # idle
    assert busy_machine_note(1, load=12.0, cpus=2) is None  # one thread: nothing to wait for
    assert busy_machine_note(8, load=2.5, cpus=16) is None  # the threads leave enough CPUs free
    assert "load average 1.2 on 2 CPUs" in busy_machine_note(2, load=1.2, cpus=2)  # one core held by another job
    note = busy_machine_note(2, load=9.7, cpus=2)
    assert "load average 9.7 on 2 CPUs" in note and "compute.threads: 1" in note

    monkeypatch.setattr("os.getloadavg", lambda: (9.7, 8.0, 6.0))  # the machine's reading, as under other jobs
    arms = [{"name": "probe", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1}]}]
    recipe = small_recipe(digits_manifest, arms, protocol={"folds": 2}, compute={"threads": 2},
                          evaluation={"report": False, "saliency": 0})
    import torch

    from stagewise.study.progress import LineReporter

    screen = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING", logger="stagewise"):
            run_study(recipe, tmp_path / "run", LineReporter(screen))
    finally:
        torch.set_num_threads(threads)  # compute.threads sets the process's; the worker's next tests keep theirs
    assert any("other work holds CPUs" in r.getMessage() and "compute.threads: 1" in r.getMessage()
               for r in caplog.records)
    assert "other work holds CPUs" in (tmp_path / "run" / "log.txt").read_text()
    assert "[stagewise] note: other work holds CPUs before training starts (load average 9.7 on" in screen.getvalue()


def test_threads_auto_times_the_counts_on_a_busy_machine_and_says_its_choice(digits_manifest, tmp_path, monkeypatch):
    """The default `compute.threads: auto` beside other work: the arm's training step timed at
    1 and 2 threads, the choice on screen, in log.txt and metrics.json, each fold recording it;
    the process's thread count is given back after the run."""
    import torch
    from conftest import small_recipe

    from stagewise.study import run_study
    from stagewise.study.progress import LineReporter
    from stagewise.training import threads as threads_module

    monkeypatch.setattr("os.getloadavg", lambda: (9.7, 8.0, 6.0))
    monkeypatch.setattr(threads_module, "usable_cpus", lambda: 2)
    arms = [{"name": "probe", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1}]}]
    recipe = small_recipe(digits_manifest, arms, protocol={"folds": 2}, evaluation={"report": False, "saliency": 0})
    assert recipe.compute.threads == "auto"
    screen, before = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = run_study(recipe, tmp_path / "run", LineReporter(screen))
        assert torch.get_num_threads() == 2  # given back
    finally:
        torch.set_num_threads(before)
    (choice,) = result.metrics["thread_choices"]  # the load did not move: chosen once
    assert choice["measured"] and set(choice["seconds_per_step"]) == {"1", "2"} and choice["before"] == "probe"
    n = choice["chosen"]
    said = f"compute.threads auto: {n} thread{'s' if n != 1 else ''} (load average 9.7 on 2 CPUs; timed 1 thread "
    assert f"[stagewise] {said}" in screen.getvalue() and said in (tmp_path / "run" / "log.txt").read_text()
    assert "note: other work holds CPUs" not in screen.getvalue()  # auto measures instead of advising
    assert [(c["threads"], c["folds"]) for c in result.metrics["arms"]["probe"]["compute"]] == [(n, 2)]
