"""`compute.threads: auto`: how many torch threads to train with, measured when other work
holds CPUs.

OpenMP threads wait for each other at the end of every parallel operation, so a thread that
shares its core with another job holds up all of them: beside other work on 2 cores one
training step took 1.52 s with 2 threads and 0.41 s with 1 (issue 26; benchmarks/bench_threads.py
has more). On an idle machine torch's default (one thread per core) is kept without
measuring. When the load average says other work holds CPUs, a few training steps of the
arm's network are timed with each candidate count (1, the CPUs the others leave free, all),
in turn so that a change of load hits them alike, and the fastest count is kept (the fewest
threads within `MARGIN` of it, leaving CPUs to the others). Before each fold the load is
read again; when it has moved by a CPU and a quarter of itself, the choice is made again.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

from stagewise.training.compute import usable_cpus

MARGIN = 0.05
"""A count other than the fewest threads must be this much faster (5 %) to be kept."""
WARMUP_STEPS = 1
TIMED_STEPS = 3
MOVED = 1.0
"""The load average must move by this much (one CPU) since the last choice to choose again ..."""
RELATIVE = 0.25
"""... and by this share of it: on a machine at load 30, a move of one CPU is noise."""


def load_average() -> float | None:
    """The 1-minute load average, None where the system has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def busy(threads: int, load: float, cpus: int) -> bool:
    """The load average says other work holds CPUs that `threads` need: at least one CPU
    more than those they leave free (the rule of `compute.busy_machine_note`)."""
    return threads > 1 and load >= cpus - min(threads, cpus) + 1


def thread_candidates(cpus: int, load: float) -> list[int]:
    """1, the CPUs the load average leaves free, and all of them (distinct, ascending)."""
    free = max(1, min(cpus, int(cpus - load + 0.5)))
    return sorted({1, free, cpus})


def time_threads(step: Callable[[], None], candidates: list[int], clock: Callable[[], float] = time.perf_counter,
                 set_threads: Callable[[int], None] = torch.set_num_threads) -> dict[int, float]:
    """Median seconds of `step()` under each thread count, the counts taken in turn (round robin)."""
    times: dict[int, list[float]] = {n: [] for n in candidates}
    for i in range(WARMUP_STEPS + TIMED_STEPS):
        for n in candidates:
            set_threads(n)
            t0 = clock()
            step()
            if i >= WARMUP_STEPS:
                times[n].append(clock() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def pick_threads(seconds: dict[int, float]) -> int:
    """The fewest threads within MARGIN of the fastest count."""
    fastest = min(seconds.values())
    return min(n for n, s in seconds.items() if s <= fastest * (1 + MARGIN))


class ThreadChooser:
    """The run's thread count under `compute.threads: auto`, chosen before the first fold and
    again when the load average moves. `load`, `clock` and `set_threads` are injectable."""

    def __init__(self, default: int | None = None, cpus: int | None = None, load: Callable[[], float | None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, set_threads: Callable[[int], None] = torch.set_num_threads):
        self.default = default or torch.get_num_threads()
        self.cpus = cpus or usable_cpus()
        self.load = load or (lambda: load_average())
        self.clock, self.set_threads = clock, set_threads
        self.current: int | None = None
        self.load_at_choice: float | None = None

    def due(self) -> bool:
        """No choice yet, or the load average moved by MOVED and RELATIVE since the last one. The
        run's own training counts in it too: an idle machine's first fold raises it, and the
        timing that follows keeps torch's default where that is fastest."""
        if self.current is None:
            return True
        load = self.load()
        return (load is not None and self.load_at_choice is not None
                and abs(load - self.load_at_choice) >= max(MOVED, RELATIVE * self.load_at_choice))

    def choose(self, step: Callable[[], None]) -> dict:
        """Set the thread count (timing `step`, one training step, only when the machine is
        busy) and return a record of the choice for log.txt, the screen and metrics.json."""
        load = self.load()
        record = {"load_average": None if load is None else round(load, 2), "cpus": self.cpus}
        if load is None or not busy(self.default, load, self.cpus):
            chosen, record["measured"] = self.default, False
        else:
            candidates = thread_candidates(self.cpus, load)
            seconds = time_threads(step, candidates, self.clock, self.set_threads)
            chosen = pick_threads(seconds)
            record |= {"measured": True, "seconds_per_step": {str(n): s for n, s in seconds.items()}}
        self.set_threads(chosen)
        self.current, self.load_at_choice = chosen, load
        return record | {"chosen": chosen}


def describe_choice(record: dict) -> str:
    """The choice in words: `2 threads (load average 0.3 on 2 CPUs: torch's default)` or
    `1 thread (load average 3.1 on 2 CPUs; timed 1 thread 0.41 s, 2 threads 1.52 s per training step)`."""
    n = record["chosen"]
    head = f"{n} thread{'s' if n != 1 else ''}"
    load = record.get("load_average")
    if not record.get("measured"):
        why = "no load average on this system" if load is None else f"load average {load:.1f}"
        return f"{head} ({why} on {record['cpus']} CPUs: torch's default)"
    timed = ", ".join(f"{k} thread{'s' if k != '1' else ''} {s:.3g} s" for k, s in record["seconds_per_step"].items())
    return f"{head} (load average {load:.1f} on {record['cpus']} CPUs; timed {timed} per training step)"
