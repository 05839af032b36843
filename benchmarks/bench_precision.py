"""Does bfloat16 autocast + channels_last keep study results within noise, and how much faster is it?

Runs the `stagewise demo` study (scikit-learn digits, 3 vs 8, two arms, 5 folds) once per
compute setting in fresh run directories and prints AUROC mean +- sd and wall time.

    python benchmarks/bench_precision.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from stagewise.demo import demo_recipe, make_demo_cohort
from stagewise.study import run_study

SETTINGS = {
    "fp32": {"precision": "fp32", "channels_last": False},
    "bf16": {"precision": "bf16", "channels_last": False},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="CV repeats per setting")
    args = parser.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_demo_cohort(Path(tmp) / "cohort")
        for name, compute in SETTINGS.items():
            recipe = demo_recipe(manifest)
            recipe.compute = recipe.compute.model_copy(update={**compute, "device": "cpu"})
            recipe.protocol = recipe.protocol.model_copy(update={"repeats": args.repeats})
            recipe.evaluation = recipe.evaluation.model_copy(update={"saliency": 0, "bootstrap": 0, "report": False})
            t0 = time.perf_counter()
            result = run_study(recipe, Path(tmp) / name)
            wall = time.perf_counter() - t0
            cells = []
            for arm, m in result.metrics["arms"].items():
                s = m["summary"]["auroc"]
                cells.append(f"{arm} AUROC {s['mean']:.4f} +- {s['sd']:.4f}")
            print(f"{name:20s} wall {wall:6.1f} s | " + " | ".join(cells))


if __name__ == "__main__":
    main()
