"""Which compute setting runs the demo study fastest here, and does `compute: auto` find it?

Runs the `stagewise demo` study (scikit-learn digits, 3 vs 8, two arms, 5 folds) under each
explicit setting (fp32, fp32 + channels_last, and bf16 with and without channels_last where
the CPU runs bf16 natively) and under the defaults (`precision: auto`, `channels_last: auto`,
which time a few training steps and keep the fastest). The settings take turns, round after
round (A/B/C/... then again), so a load change on this shared machine hits them alike; the
table gives each setting's median wall time and AUROC. The defaults' first round includes
the measurement (a fresh cache directory); later rounds read the cached choice.

    python benchmarks/bench_precision.py [--rounds 3] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stagewise.study.demo import demo_recipe, make_demo_cohort
from stagewise.study import run_study
from stagewise.training.autotune import cpu_model
from stagewise.training.compute import cpu_has_fast_bf16

EXPLICIT = {
    "fp32": {"precision": "fp32", "channels_last": False},
    "fp32+channels_last": {"precision": "fp32", "channels_last": True},
    "bf16": {"precision": "bf16", "channels_last": False},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="times each setting runs (in turn)")
    parser.add_argument("--repeats", type=int, default=1, help="CV repeats per study")
    args = parser.parse_args()
    cpu = cpu_model()
    print(f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, native bf16: {cpu_has_fast_bf16()}")
    settings = {"defaults (auto)": {}} | {k: v for k, v in EXPLICIT.items() if "bf16" not in k or cpu_has_fast_bf16()}
    walls: dict[str, list[float]] = {name: [] for name in settings}
    aurocs: dict[str, str] = {}
    chosen = "-"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["STAGEWISE_CACHE_DIR"] = str(Path(tmp) / "cache")  # the first auto run measures
        manifest = make_demo_cohort(Path(tmp) / "cohort")
        for r in range(args.rounds):
            for name, compute in settings.items():
                recipe = demo_recipe(manifest)
                recipe.compute = recipe.compute.model_copy(update={**compute, "device": "cpu"})
                recipe.protocol = recipe.protocol.model_copy(update={"repeats": args.repeats})
                recipe.evaluation = recipe.evaluation.model_copy(update={"saliency": 0, "bootstrap": 0, "report": False})
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                result = run_study(recipe, Path(tmp) / f"{name}-{r}")
                walls[name].append(time.perf_counter() - t0)
                if not compute:
                    chosen = result.metrics["compute"]
                aurocs[name] = " | ".join(f"{arm} {m['summary']['auroc']['mean']:.4f}"
                                          for arm, m in result.metrics["arms"].items())
                print(f"round {r + 1} {name:20s} wall {walls[name][-1]:6.1f} s (load {load:.2f}) "
                      f"compute {result.metrics['compute']}", flush=True)
    fastest = min((n for n in settings if n != "defaults (auto)"), key=lambda n: statistics.median(walls[n]))
    print(f"\nmedian wall over {args.rounds} rounds (load at end {os.getloadavg()[0]:.2f}); defaults chose: {chosen}")
    for name in settings:
        med = statistics.median(walls[name])
        print(f"{name:20s} {med:6.1f} s  ({med / statistics.median(walls[fastest]):.2f}x the fastest explicit) "
              f"AUROC {aurocs[name]}")
    print(f"defaults vs fastest explicit ({fastest}): "
          f"{statistics.median(walls['defaults (auto)']) / statistics.median(walls[fastest]) - 1:+.1%}")


if __name__ == "__main__":
    main()
