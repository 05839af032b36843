"""A resumed run reports what each unit's folds actually ran with, never one setting for all."""

import html
import json

import pytest
import torch

from conftest import StopAfter, small_recipe
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 1, "batch_size": 16, "lr": 3e-3}
ARMS = [{"name": "a", "backbone": "scratch:tinycnn", "stages": [PROBE]}]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _recipe(manifest, threads):
    return small_recipe(manifest, ARMS, protocol={"folds": 2}, compute={"threads": threads},
                        evaluation={"saliency": 0, "bootstrap": 0})


def test_resumed_run_with_other_threads_reports_both_settings_per_unit(digits_manifest, tmp_path, restore_threads):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_study(_recipe(digits_manifest, 1), run, reporter=StopAfter(1))  # one fold at 1 thread
    first = json.loads((run / "folds/a/r0-f0.json").read_text())
    assert first["compute"] == "cpu fp32" and first["threads"] == 1  # each fold records what it ran with
    result = run_study(_recipe(digits_manifest, 2), run)  # resumed: the other fold at 2 threads
    metrics = json.loads((run / "metrics.json").read_text())
    settings = {s["setting"]: s["folds"] for s in metrics["arms"]["a"]["compute"]}
    assert settings == {"cpu fp32, 1 thread": 1, "cpu fp32, 2 threads": 1}
    assert result.metrics["arms"]["a"]["compute"] == metrics["arms"]["a"]["compute"]
    # baselines and the clinical model train no network: no compute of their own
    assert all("compute" not in u for n, u in metrics["arms"].items() if n != "a")
    # the run as a whole claims no single setting
    assert {s["setting"]: s["folds"] for s in metrics["compute_folds"]} == settings
    env = json.loads((run / "environment.json").read_text())
    assert "cpu_threads" not in env and env["cpu_threads_this_session"] == 2
    assert env["folds_compute"]["a"] == ["cpu fp32, 1 thread (1 fold)", "cpu fp32, 2 threads (1 fold)"]
    log = (run / "log.txt").read_text()
    assert "the folds of a ran under different settings (cpu fp32, 1 thread (1 fold); cpu fp32, 2 threads (1 fold))" in log
    page = html.unescape((run / "report.html").read_text(encoding="utf-8"))
    header = page[page.index('<header'):page.index('</header>')]
    assert "compute <b>mixed: cpu fp32, 1 thread (1 fold); cpu fp32, 2 threads (1 fold)</b>" in header
    timings = page[page.index('id="training-time"'):]
    assert "<td>cpu fp32, 1 thread (1 fold); cpu fp32, 2 threads (1 fold)</td>" in timings
    assert "a: its folds ran under different compute settings" in timings


def test_a_run_in_one_session_names_its_one_setting(digits_manifest, tmp_path, restore_threads):
    run_study(_recipe(digits_manifest, 1), tmp_path / "run")
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["compute"] == "cpu fp32"
    assert metrics["arms"]["a"]["compute"] == [{"setting": "cpu fp32, 1 thread", "compute": "cpu fp32", "threads": 1,
                                                "folds": 2}]
    assert "different settings" not in (tmp_path / "run/log.txt").read_text()
    page = (tmp_path / "run/report.html").read_text(encoding="utf-8")
    assert "compute <b>cpu fp32, 1 thread</b>" in page and "compute-mixed" not in page
