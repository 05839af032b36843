"""Progress where no live bar can draw: plain lines for pipes and logs, run_study from Python,
and a refit; only trained folds are counted, with an ETA."""

import io

import numpy as np
from typer.testing import CliRunner

from stagewise.cli import app
from stagewise.evaluation.splits import Split
from stagewise.study.fitting import refit
from stagewise.study.progress import LineReporter, fmt_duration, fmt_fold_metrics
from stagewise.recipe import load_recipe
from stagewise.study import run_study


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _split(fold):
    return Split(0, fold, np.arange(0), np.arange(0))


def test_line_reporter_counts_trained_folds_only_and_gives_an_eta():
    out, clock = io.StringIO(), Clock()
    rep = LineReporter(out, clock=clock)
    rep.start(9)  # 2 model units + a baseline, 3 splits
    rep.plan(["probe", "thaw"], 3)
    rep.fold_done("probe", _split(0), {"auroc": 0.9}, resumed=True)  # read back: not trained now
    for fold in range(3):
        rep.fold_done("baseline:grade", _split(fold), {"auroc": 0.6}, resumed=False)  # never counted
    clock.now = 10.0
    rep.fold_done("probe", _split(1), {"auroc": 0.8125, "balanced_accuracy": 0.75}, resumed=False)
    clock.now = 20.0
    rep.fold_done("probe", _split(2), {"auroc": 0.7}, resumed=False)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[stagewise] 6 folds to train (2 model units x 3 splits)"
    assert lines[1] == "[stagewise] probe r0-f0: finished earlier, read back"
    assert lines[2] == "[stagewise] fold 1/5 trained: probe r0-f1: AUROC 0.812, balanced acc. 0.750; ETA 40 s"
    assert lines[3] == "[stagewise] fold 2/5 trained: probe r0-f2: AUROC 0.700; ETA 30 s"
    assert not any("baseline" in line for line in lines)
    assert (fmt_duration(59.6), fmt_duration(200), fmt_duration(7300)) == ("1 min 00 s", "3 min 20 s", "2 h 01 min")


def test_run_from_a_pipe_prints_lines_python_and_refit_report_progress(digits_manifest, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: p\ncohort: {{manifest: {digits_manifest}}}\ndata: {{image_size: 32}}\n"
        "protocol: {folds: 2, repeats: 1}\ncompute: {device: cpu, precision: fp32, channels_last: false}\n"
        "evaluation: {bootstrap: 0, saliency: 0, report: false}\n"
        "arms:\n  - {name: a, backbone: 'scratch:tinycnn', stages: [{kind: probe, epochs: 1, batch_size: 32}]}\n")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out)])  # stdout/stderr are not a terminal
    assert res.exit_code == 0, res.output
    assert "[stagewise] 2 folds to train" in res.output
    assert "[stagewise] fold 1/2 trained: a r0-f0: AUROC" in res.output and "ETA" in res.output
    assert "fold 2/2 trained: a r0-f1" in res.output and "all trained" in res.output
    capsys.readouterr()
    run_study(load_recipe(recipe), out)  # from Python: no reporter given, progress still shows
    assert "[stagewise] a r0-f0: finished earlier, read back" in capsys.readouterr().err
    refit(load_recipe(recipe), "a", out)  # export --refit trains on every image: epoch lines with an ETA
    err = capsys.readouterr().err
    assert "[stagewise] refit a on every image: training, 1 epoch" in err
    assert "[stagewise] epoch 1/1 (probe) loss" in err and "ETA 0 s" in err


def test_fold_metrics_are_a_readable_line_not_a_dict():
    metrics = {"auroc": 0.91234, "balanced_accuracy": 0.85, "ppv": float("nan"), "tp": 12, "threshold": 0.4321,
               "n_test_patients": 14, "sites": {"a": {"auroc": 0.9}}, "tasks": {}, "flag": True}
    line = fmt_fold_metrics(metrics)
    assert line == "AUROC 0.9123, balanced accuracy 0.8500, PPV n/a, TP 12, threshold 0.4321, test patients 14"
    assert "{" not in line and "'" not in line
