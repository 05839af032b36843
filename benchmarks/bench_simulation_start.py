"""What a Flower simulation costs before its first round, with and without kept site workers.

    python benchmarks/bench_simulation_start.py [--runs 3]

Runs the same tiny federated fold (2 sites of 12 scanned digits, tinycnn, 32 px, 2 probe
rounds) `--runs` times inside one `one_ray_instance` block (Ray and the site workers kept
between simulations, as a study's folds run), then `--runs` times each in a block of its own
(a fresh Ray and fresh workers: what every fold paid before the workers were kept). Prints each
run's wall time, the seconds from the first message sent to the first reply, and the load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import loadavg  # noqa: E402
from stagewise.data import load_images  # noqa: E402
from stagewise.federated.simulation import run_federated  # noqa: E402
from stagewise.federated.simulation_session import one_ray_instance  # noqa: E402
from stagewise.federated.site import SitePartition  # noqa: E402
from stagewise.models import Network, build_arch  # noqa: E402
from stagewise.recipe import ArmConfig, ComputeConfig  # noqa: E402
from stagewise.study.demo import make_demo_cohort  # noqa: E402
from stagewise.training.autotune import cpu_model  # noqa: E402
from stagewise.training.cache import ImageSet  # noqa: E402
from stagewise.training.compute import resolve_compute  # noqa: E402

ARM = ArmConfig.model_validate({"name": "f", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
                                "stages": [{"kind": "probe", "rounds": 2, "epochs": 1, "batch_size": 8}]})


def sites() -> list[SitePartition]:
    folder = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    table = pd.read_csv(make_demo_cohort(folder, per_class=40)).head(24)
    x = load_images([str(folder / p) for p in table["path"]], 32)
    y = torch.tensor(table[["outcome"]].to_numpy(), dtype=torch.float32)
    out = []
    for name, rows in (("A", np.arange(0, 12)), ("B", np.arange(12, 24))):
        r = torch.as_tensor(rows)
        out.append(SitePartition(name, ImageSet(x[r], f"bench:{name}"), y[r], np.arange(12), np.arange(12)))
    return out


def one_run(parts, compute) -> tuple[float, float]:
    """Wall seconds of one simulation and seconds from the first message down to the first reply."""
    torch.manual_seed(0)
    start = Network.build(build_arch("scratch:tinycnn"), 1)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    run_federated(ARM, start, parts, compute, 0,
                  on_message=lambda direction, _m: times.setdefault(direction, time.perf_counter()))
    return time.perf_counter() - t0, times["up"] - times["down"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    compute = resolve_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False))
    parts = sites()
    print(f"{cpu_model()}; load average before {loadavg()}")
    with one_ray_instance():
        for i in range(args.runs):
            wall, first = one_run(parts, compute)
            print(f"kept workers, run {i + 1}:   wall {wall:5.1f} s, first reply after {first:5.1f} s  (load {loadavg()})")
    for i in range(args.runs):
        with one_ray_instance():
            wall, first = one_run(parts, compute)
        print(f"fresh Ray + workers, run {i + 1}: wall {wall:5.1f} s, first reply after {first:5.1f} s  (load {loadavg()})")


if __name__ == "__main__":
    main()
