"""Torch threads on a machine other jobs keep busy: 1 thread against all CPUs' worth.

Why: OpenMP threads wait for each other at the end of every parallel operation; when other
processes hold the cores, a waiting thread spins or sleeps while the one it waits for is not
running, and a fold can take many times longer than with one thread. stagewise logs a note at
the start of a run when the load average is above the CPUs + 1 (training/compute.py,
`busy_machine_note`); this measures what the note promises.

    python benchmarks/bench_threads.py [--busy 0 2 4] [--rounds 3] [--size 64]

For each number of busy processes (each a pure-Python spin loop, as another job's process
would hold a core), one fold's `fit_stage` (scratch:resnet18 thaw of layer4 + head, 48
images, batch 16, 4 epochs, 64 px, fp32) is timed with 1 thread and with one thread per CPU, the two
taking turns `--rounds` times; medians are printed with the load average.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import loadavg  # noqa: E402 - the load line every benchmark prints
from stagewise.models import Network, build_arch  # noqa: E402
from stagewise.recipe import ComputeConfig, ThawStage  # noqa: E402
from stagewise.training.autotune import cpu_model  # noqa: E402
from stagewise.training.cache import ImageSet  # noqa: E402
from stagewise.training.compute import resolve_compute, usable_cpus  # noqa: E402
from stagewise.training.engine import fit_stage  # noqa: E402


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def _time_fold(start: Network, stage: ThawStage, images: ImageSet, y: torch.Tensor, threads: int) -> float:
    torch.set_num_threads(threads)
    compute = resolve_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False, reuse_frozen=False))
    net = copy.deepcopy(start)
    t0 = time.perf_counter()
    fit_stage(net, stage, images, np.arange(len(y)), y, compute, None, seed=0)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2, 4], help="busy processes besides this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    cpus = usable_cpus()
    print(f"machine: {cpu_model()}, {cpus} CPUs, torch {torch.__version__}, python {platform.python_version()}")
    print(f"load average at start: {loadavg()}")
    g = torch.Generator().manual_seed(0)
    n = 48
    images = ImageSet(torch.rand(n, 1, args.size, args.size, generator=g).half(), key=f"bench-threads-{args.size}")
    y = (torch.arange(n) % 2).float().unsqueeze(1)
    torch.manual_seed(0)
    start = Network.build(build_arch("scratch:resnet18"), dropout=0.1)
    stage = ThawStage(epochs=4, batch_size=16, lr=1e-3, unfreeze={"layer4": 0.0})
    _time_fold(start, stage, images, y, cpus)  # warm-up (oneDNN primitives, allocator)
    for busy in args.busy:
        stop = mp.Event()
        spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        try:
            time.sleep(2.0 if busy else 0.0)
            times = {1: [], cpus: []}
            for _ in range(args.rounds):
                for threads in times:
                    times[threads].append(_time_fold(start, stage, images, y, threads))
        finally:
            stop.set()
            for p in spinners:
                p.join(5)
        one, many = statistics.median(times[1]), statistics.median(times[cpus])
        print(f"{busy} busy processes: 1 thread {one:6.2f} s | {cpus} threads {many:6.2f} s | "
              f"{cpus} threads / 1 thread = {many / one:.2f}x | runs {[round(t, 2) for t in times[1]]} vs "
              f"{[round(t, 2) for t in times[cpus]]} | load {loadavg()}", flush=True)


if __name__ == "__main__":
    main()
