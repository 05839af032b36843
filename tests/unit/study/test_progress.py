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


def _study_lines(clock, seconds_per_epoch, overhead=0.5):
    """Two units on 3 splits, fold by fold as a local run reports them: `probe` (2 probe
    epochs) then `thaw` (2 probe + 2 thaw epochs). Returns each trained fold's line and the
    true seconds left after it."""
    out = io.StringIO()
    rep = LineReporter(out, clock=clock)
    stages = {"probe": [("probe", 2)], "thaw": [("probe", 2), ("thaw", 2)]}
    rep.start(6)
    rep.plan(["probe", "thaw"], 3, stages, {"probe": 1.0, "thaw": 1.0})
    schedule = [(unit, fold) for unit in ("probe", "thaw") for fold in range(3)]
    fold_seconds = {u: sum(e * seconds_per_epoch[k] for k, e in st) + overhead for u, st in stages.items()}
    truth = []
    for i, (unit, fold) in enumerate(schedule):
        rep.fold_started(unit, _split(fold), sum(e for _, e in stages[unit]))
        for kind, epochs in stages[unit]:
            for e in range(epochs):
                clock.now += seconds_per_epoch[kind]
                rep.epoch_done(kind, e, {"loss": 0.5})
        clock.now += overhead
        rep.fold_done(unit, _split(fold), {"auroc": 0.9}, resumed=False)
        truth.append(sum(fold_seconds[u] for u, _ in schedule[i + 1:]))
    return out.getvalue().splitlines()[1:], truth


def test_the_eta_times_each_units_epochs_and_does_not_jump():
    """A probe epoch over cached features is cheap, a thaw epoch is not: the ETA counts each
    unit's own epochs left at their measured seconds, and names a stage kind not timed yet."""
    clock = Clock()
    lines, truth = _study_lines(clock, {"probe": 1.0, "thaw": 10.0})
    # after the probe folds: the thaw unit's probe epochs are known, its thaw epochs are not (a lower bound, said)
    assert lines[0].endswith(f"ETA at least {fmt_duration(truth[0] - 3 * 20)} (thaw not timed yet)")
    assert lines[2].endswith("ETA at least 8 s (thaw not timed yet)") and truth[2] == 3 * 22.5  # 3 x (2 probe epochs + 0.5 s)
    # once a thaw epoch is timed, the ETA is the time left exactly, and falls by the time spent
    assert lines[3].endswith(f"ETA {fmt_duration(truth[3])}") and truth[3] == 45
    assert lines[4].endswith("ETA 22 s") and truth[4] == 22.5
    assert lines[5].endswith("all trained")
    # a folds-done average would have said 3 x 2.5 s after fold 3, then 45 s, then ~34 s: no such jumps here


def test_a_unit_not_started_borrows_other_units_seconds_per_epoch_by_share():
    from stagewise.study.progress import EtaEstimator

    clock = Clock()
    eta = EtaEstimator(clock)
    eta.plan({"a": [("probe", 4)], "a@50%": [("probe", 4)]}, 2, {"a": 1.0, "a@50%": 0.5})
    for fold in range(2):
        eta.fold_started("a")
        for _ in range(4):
            clock.now += 2.0
            eta.epoch_done("probe")
        eta.fold_done("a", resumed=False)
    assert eta.seconds_left() == (2 * 4 * 1.0, [])  # half the images: half of a's 2 s per epoch, no overhead
    assert eta.text() == "ETA 8 s"


def test_run_from_a_pipe_prints_lines_python_and_refit_report_progress(digits_manifest, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: p\ncohort: {{manifest: {digits_manifest}}}\ndata: {{image_size: 32}}\n"
        "protocol: {folds: 2, repeats: 1}\ncompute: {device: cpu, precision: fp32, channels_last: false}\n"
        "evaluation: {bootstrap: 20, saliency: 0, report: true}\n"
        "arms:\n  - {name: a, backbone: 'scratch:tinycnn', stages: [{kind: probe, epochs: 1, batch_size: 32}]}\n")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out)])  # stdout/stderr are not a terminal
    assert res.exit_code == 0, res.output
    assert "[stagewise] 2 folds to train" in res.output
    assert "[stagewise] fold 1/2 trained: a r0-f0: AUROC" in res.output and "ETA" in res.output
    assert "fold 2/2 trained: a r0-f1" in res.output and "all trained" in res.output
    # after training, each step is said as it starts, and the whole is timed at the end
    after = res.output.split("all trained", 1)[1]
    steps = ["[stagewise] statistics of a: 95 % CIs from 20 patient resamples, calibration and decision curves "
             "(unit 1/1) ...", "[stagewise] comparisons: 0 pair(s) of units", "[stagewise] writing metrics.json",
             "[stagewise] report: figures and report.html ...", "[stagewise] statistics and report done in "]
    assert all(step in after for step in steps), after
    assert [after.index(step) for step in steps] == sorted(after.index(step) for step in steps)
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
