"""Plain progress lines for logs, pipes and notebooks, where a live progress bar cannot draw.

`stagewise run ... 2>&1 | tee log`, a batch job or `run_study()` in a notebook would otherwise
print nothing for minutes. `LineReporter` writes one line per trained fold (its metrics, the
count of folds trained so far out of those left to train, and an ETA from `EtaEstimator`);
baseline scores and the clinical model, which train nothing worth waiting for, and folds read
back from an earlier run are not counted. With `epochs=True` (a refit, one long training) it
writes one line per epoch with an ETA over the epochs instead.

An ETA from the folds done so far jumped (55 s after the cheap probe folds, then 7 min, then
11 min): a probe epoch over cached features costs a fraction of a thaw epoch. `EtaEstimator`
times each unit's epochs by stage kind and multiplies by the epochs left; a unit not started
yet borrows the seconds per epoch its stage kinds took in other units (scaled by its share of
the training images), and a stage kind no unit has run yet is named as not timed, the ETA
then a lower bound. `Phases` says what runs after training (statistics, report, bundle).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO
from stagewise.text import counted


def fmt_duration(seconds: float) -> str:
    """`45 s`, `3 min 20 s`, `2 h 05 min`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


_METRIC_LABELS = {
    "auroc": "AUROC", "auprc": "AUPRC", "balanced_accuracy": "balanced accuracy", "f1": "F1", "ppv": "PPV",
    "npv": "NPV", "tp": "TP", "fp": "FP", "tn": "TN", "fn": "FN", "train_auroc": "training AUROC",
    "inner_auroc": "inner out-of-fold AUROC",
    "n_test_patients": "test patients", "n_train_patients": "training patients",
    "train_prevalence_images": "training prevalence (images)",
}


def fmt_fold_metrics(metrics: dict) -> str:
    """A fold's scalar metrics as one line a person reads in log.txt, e.g. `AUROC 0.9120,
    balanced accuracy 0.8500, ..., TP 12, test patients 14`: named, four decimals, counts as
    integers, an undefined rate (NaN) as n/a. Nested figures (per site, per extra outcome)
    are left to the fold's json."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        label = _METRIC_LABELS.get(key, key.replace("_", " "))
        shown = str(value) if isinstance(value, int) else "n/a" if value != value else f"{value:.4f}"
        parts.append(f"{label} {shown}")
    return ", ".join(parts)


class EtaEstimator:
    """Seconds left of a study's training, from each unit's own measured seconds per epoch
    (by stage kind) times its epochs left, plus each fold's time outside its epochs (scoring,
    saving). Fed the reporter's calls; `clock` is injectable for tests."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.stages: dict[str, list[tuple[str, int]]] = {}
        """unit -> its stages of one fold, (kind, epochs), in order."""
        self.share: dict[str, float] = {}
        """unit -> its share of each fold's training images (its label fraction)."""
        self.folds_left: dict[str, int] = {}
        self.per_epoch: dict[tuple[str, str], list[float]] = {}
        self.overhead: dict[str, list[float]] = {}
        self.fold_seconds: dict[str, list[float]] = {}
        self.unit: str | None = None
        self.epochs_done: list[str] = []
        self.fold_t0 = self.last = 0.0

    def plan(self, stages: dict[str, list[tuple[str, int]]], n_splits: int, share: dict[str, float] | None = None):
        self.stages = {u: list(s) for u, s in stages.items()}
        self.share = {u: (share or {}).get(u, 1.0) for u in stages}
        self.folds_left = {u: n_splits for u in stages}

    def fold_started(self, unit: str) -> None:
        """A fold of `unit` starts (a name outside the plan, e.g. an arm's pretraining, is not counted)."""
        self.unit = unit if unit in self.stages else None
        self.epochs_done, self.fold_t0 = [], self.clock()
        self.last = self.fold_t0
        if self.unit is not None:
            self.folds_left[unit] = max(0, self.folds_left[unit] - 1)

    def epoch_done(self, kind: str) -> None:
        now = self.clock()
        if self.unit is not None:
            self.per_epoch.setdefault((self.unit, kind), []).append(now - self.last)
            self.epochs_done.append(kind)
        self.last = now

    def fold_done(self, unit: str, resumed: bool) -> None:
        if unit not in self.stages:
            return
        if resumed:  # read back: one fold fewer to train
            self.folds_left[unit] = max(0, self.folds_left[unit] - 1)
            return
        now = self.clock()
        if self.unit == unit:
            self.fold_seconds.setdefault(unit, []).append(now - self.fold_t0)
            if self.epochs_done:
                self.overhead.setdefault(unit, []).append(now - self.last)
        self.unit, self.epochs_done = None, []

    def _rate(self, unit: str, kind: str) -> float | None:
        own = self.per_epoch.get((unit, kind))
        if own:
            return sum(own) / len(own)
        other = [sum(t) / len(t) / self.share[u] for (u, k), t in self.per_epoch.items() if k == kind and t]
        return sum(other) / len(other) * self.share[unit] if other else None

    def _fold(self, unit: str, untimed: set[str], skip: list[str] = ()) -> float:
        """Seconds of one fold of `unit`, less the epochs in `skip` (those the current fold ran)."""
        if not any(u == unit for u, _ in self.per_epoch) and self.fold_seconds.get(unit):
            return sum(self.fold_seconds[unit]) / len(self.fold_seconds[unit])  # no epochs reported (a site arm)
        left = list(skip)
        seconds = 0.0
        for kind, epochs in self.stages[unit]:
            ran = min(epochs, left.count(kind))
            for _ in range(ran):
                left.remove(kind)
            rate = self._rate(unit, kind)
            if rate is None:
                untimed.add(kind)
            else:
                seconds += rate * (epochs - ran)
        over = self.overhead.get(unit) or [x for v in self.overhead.values() for x in v]
        return seconds + (sum(over) / len(over) if over else 0.0)

    @property
    def timed(self) -> bool:
        """Whether a fold was timed here (a remote executor's folds are not: no fold_started)."""
        return bool(self.fold_seconds)

    def seconds_left(self) -> tuple[float, list[str]]:
        """(seconds, stage kinds not timed yet): with any untimed kind the seconds are a lower bound."""
        untimed: set[str] = set()
        total = sum(n * self._fold(u, untimed) for u, n in self.folds_left.items() if n)
        if self.unit is not None:
            total += max(0.0, self._fold(self.unit, untimed, self.epochs_done) - (self.clock() - self.last))
        return total, sorted(untimed)

    def text(self) -> str:
        """`ETA 3 min 20 s`, or `ETA at least 55 s (thaw not timed yet)`."""
        seconds, untimed = self.seconds_left()
        if untimed:
            return f"ETA at least {fmt_duration(seconds)} ({', '.join(untimed)} not timed yet)"
        return f"ETA {fmt_duration(seconds)}"


class Phases:
    """What runs after training, one line as each step starts, and a closing line with each
    step's seconds: bootstrap and comparisons, the report's figures, a bundle's parts."""

    def __init__(self, say, clock=time.monotonic):
        self.say, self.clock = say, clock
        self.done: list[tuple[str, float]] = []
        self.name: str | None = None
        self.t0 = 0.0

    def step(self, name: str, detail: str = "") -> None:
        """`name` starts now (and the step before it ends)."""
        self._close()
        self.name, self.t0 = name, self.clock()
        self.say(f"{name}{': ' + detail if detail else ''} ...")

    def _close(self) -> None:
        if self.name is not None:
            self.done.append((self.name, self.clock() - self.t0))
            self.name = None

    def finish(self, what: str) -> None:
        self._close()
        if self.done:
            total = sum(s for _, s in self.done)
            parts = ", ".join(f"{name} {fmt_duration(s)}" for name, s in self.done)
            self.say(f"{what} in {fmt_duration(total)} ({parts})")
        self.done = []


def unit_stages(units) -> tuple[dict[str, list[tuple[str, int]]], dict[str, float]]:
    """The model units' stages of one fold, (kind, epochs), and their label fractions, for
    `plan`: stages on a source manifest run once per arm, not per fold, and are left out."""
    stages = {u.name: [(s.kind, s.epochs) for s in u.arm.stages if not s.external] for u in units if u.kind == "model"}
    return stages, {u.name: u.fraction for u in units if u.kind == "model"}


class LineReporter:
    """A study's progress as plain lines on `stream` (default: stderr)."""

    def __init__(self, stream: TextIO | None = None, epochs: bool = False, clock=time.monotonic):
        self.stream, self.epochs, self.clock = stream, epochs, clock
        self.trained_units: set[str] | None = None
        self.total = self.done = self.resumed = 0
        self.t0 = self.fold_t0 = clock()
        self.n_epochs = self.epoch = 0
        self.eta = EtaEstimator(clock)

    def _print(self, text: str) -> None:
        print(f"[stagewise] {text}", file=self.stream or sys.stderr, flush=True)

    def start(self, total_folds: int) -> None:
        self.total, self.t0 = total_folds, self.clock()

    def plan(self, trained_units: list[str], n_splits: int, stages: dict | None = None,
             share: dict | None = None) -> None:
        """The units that train a network (model arms): only their folds are counted; `stages`
        (unit -> [(kind, epochs)], see `unit_stages`) and `share` (label fractions) time the ETA."""
        self.trained_units, self.total, self.t0 = set(trained_units), len(trained_units) * n_splits, self.clock()
        self.eta.plan(stages or {u: [] for u in trained_units}, n_splits, share)
        self._print(f"{counted(self.total, 'fold')} to train ({counted(len(trained_units), 'model unit')} x "
                    f"{counted(n_splits, 'split')})")

    def fold_started(self, arm, split, n_epochs) -> None:
        self.fold_t0, self.n_epochs, self.epoch = self.clock(), n_epochs, 0
        self.eta.fold_started(arm)
        if self.epochs:
            self._print(f"{arm}: training, {counted(n_epochs, 'epoch')}")

    def epoch_done(self, stage, epoch, entry) -> None:
        self.epoch += 1
        self.eta.epoch_done(stage)
        if not self.epochs:
            return
        spent = self.clock() - self.fold_t0
        eta = spent / self.epoch * (self.n_epochs - self.epoch)
        loss = entry.get("loss")
        self._print(f"epoch {self.epoch}/{self.n_epochs} ({stage})" + (f" loss {loss:.3f}" if loss is not None else "")
                    + f"; {fmt_duration(spent)} so far, ETA {fmt_duration(eta)}")

    def fold_done(self, arm, split, metrics, resumed) -> None:
        if self.trained_units is not None and arm not in self.trained_units:
            return  # a baseline score or the clinical model: nothing trained, nothing to wait for
        self.eta.fold_done(arm, resumed)
        if resumed:
            self.resumed += 1
            self._print(f"{arm} {split.name}: finished earlier, read back")
            return
        self.done += 1
        left = self.total - self.resumed - self.done
        shown = ", ".join(f"{label} {metrics[k]:.3f}" for k, label in (("auroc", "AUROC"), ("balanced_accuracy", "balanced acc."))
                          if isinstance(metrics.get(k), (int, float)))
        per_fold = (self.clock() - self.t0) / self.done  # a remote executor's folds report no epochs
        ending = ("all trained" if not left else self.eta.text() if self.eta.timed
                  else f"ETA {fmt_duration(per_fold * left)}")
        self._print(f"fold {self.done}/{self.total - self.resumed} trained: {arm} {split.name}: {shown}; {ending}")

    def message(self, text: str) -> None:
        self._print(text)
