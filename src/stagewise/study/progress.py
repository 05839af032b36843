"""Plain progress lines for logs, pipes and notebooks, where a live progress bar cannot draw.

`stagewise run ... 2>&1 | tee log`, a batch job or `run_study()` in a notebook would otherwise
print nothing for minutes. `LineReporter` writes one line per trained fold (its metrics, the
count of folds trained so far out of those left to train, and an ETA from the mean time per
trained fold); baseline scores and the clinical model, which train nothing worth waiting for,
and folds read back from an earlier run are not counted. With `epochs=True` (a refit, one long
training) it writes one line per epoch with an ETA over the epochs instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


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


def fmt_timings(record: dict) -> str:
    """'fp32 0.41 s, bf16 0.22 s per step (measured)' for the log and the report."""
    seconds = record.get("seconds_per_step")
    if not seconds:
        return "as the recipe says"
    steps = ", ".join(f"{label.split(' ', 1)[1]} {s:.3g} s" for label, s in seconds.items())
    return f"{steps} per training step, {'from the cache' if record.get('cached') else 'measured now'}"


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


class LineReporter:
    """A study's progress as plain lines on `stream` (default: stderr)."""

    def __init__(self, stream: TextIO | None = None, epochs: bool = False, clock=time.monotonic):
        self.stream, self.epochs, self.clock = stream, epochs, clock
        self.trained_units: set[str] | None = None
        self.total = self.done = self.resumed = 0
        self.t0 = self.fold_t0 = clock()
        self.n_epochs = self.epoch = 0

    def _print(self, text: str) -> None:
        print(f"[stagewise] {text}", file=self.stream or sys.stderr, flush=True)

    def start(self, total_folds: int) -> None:
        self.total, self.t0 = total_folds, self.clock()

    def plan(self, trained_units: list[str], n_splits: int) -> None:
        """The units that train a network (model arms): only their folds are counted."""
        self.trained_units, self.total, self.t0 = set(trained_units), len(trained_units) * n_splits, self.clock()
        self._print(f"{self.total} folds to train ({len(trained_units)} model unit(s) x {n_splits} splits)")

    def fold_started(self, arm, split, n_epochs) -> None:
        self.fold_t0, self.n_epochs, self.epoch = self.clock(), n_epochs, 0
        if self.epochs:
            self._print(f"{arm}: training, {n_epochs} epochs")

    def epoch_done(self, stage, epoch, entry) -> None:
        self.epoch += 1
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
        if resumed:
            self.resumed += 1
            self._print(f"{arm} {split.name}: finished earlier, read back")
            return
        self.done += 1
        left = self.total - self.resumed - self.done
        per_fold = (self.clock() - self.t0) / self.done
        shown = ", ".join(f"{label} {metrics[k]:.3f}" for k, label in (("auroc", "AUROC"), ("balanced_accuracy", "balanced acc."))
                          if isinstance(metrics.get(k), (int, float)))
        ending = f"ETA {fmt_duration(per_fold * left)}" if left else "all trained"
        self._print(f"fold {self.done}/{self.total - self.resumed} trained: {arm} {split.name}: {shown}; {ending}")

    def message(self, text: str) -> None:
        self._print(text)
