"""K folds of one arm trained one after another (`fit_stage`) vs together (`fit_folds`).

Why: on a GPU, one small fold's batch leaves most of the device idle; batching K folds into
one vmapped network should cost about one fold's time. On a CPU the cores are already busy,
so the CPU figure mainly shows the overhead of the vmapped path (grouped convolutions,
per-fold optimizers), and the GPU figure is the one the design is for.

    python benchmarks/bench_fold_batch.py [--folds 5] [--cpu-size 64] [--cpu-arch scratch:resnet18]

On CPU: `--cpu-arch` at `--cpu-size` px, batch 16, 48 images per fold, a 1-epoch probe on a
frozen backbone without the prefix cache (the backbone still runs) and a 1-epoch finetune.
With CUDA (the BPD shape): torchvision:resnet50 at 512 px, batch 8, bf16 autocast, 64 images
per fold, the same two stages. Each figure is one timed run after a warm-up.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch

from stagewise.models import Network, build_arch
from stagewise.recipe import ComputeConfig, FinetuneStage, ProbeStage
from stagewise.training.cache import ImageSet
from stagewise.training.compute import resolve_compute
from stagewise.training.engine import fit_stage
from stagewise.training.fold_batch import fit_folds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(arch: str, size: int, batch: int, per_fold: int, n_folds: int, compute, label: str) -> None:
    device = compute.device
    n = per_fold + n_folds * 4
    g = torch.Generator().manual_seed(0)
    images = ImageSet(torch.rand(n, 1, size, size, generator=g).half(), key=f"bench-fold-batch-{size}")
    y = (torch.arange(n) % 2).float().unsqueeze(1)
    folds = [np.arange(4 * k, 4 * k + per_fold) for k in range(n_folds)]  # overlapping, like CV training sets
    seeds = list(range(n_folds))
    torch.manual_seed(0)
    start = Network.build(build_arch(arch), dropout=0.1).to(device)
    stages = {"probe (backbone frozen, no cache)": ProbeStage(epochs=1, batch_size=batch, lr=1e-3),
              "finetune": FinetuneStage(epochs=1, batch_size=batch, lr=1e-4)}
    print(f"\n== {label}: {arch}, {size} px, batch {batch}, {per_fold} images per fold, K = {n_folds}, {compute.label} ==")
    for name, stage in stages.items():
        # warm-up both paths once (oneDNN/cuDNN primitive creation, allocator)
        fit_stage(copy.deepcopy(start), stage, images, folds[0][:2 * batch], y, compute, None, seed=0)
        fit_folds([copy.deepcopy(start) for _ in range(2)], stage, images, [f[:2 * batch] for f in folds[:2]], y,
                  compute, None, seeds[:2])
        nets = [copy.deepcopy(start) for _ in range(n_folds)]
        _sync(device)
        t0 = time.perf_counter()
        for net, idx, s in zip(nets, folds, seeds):
            fit_stage(net, stage, images, idx, y, compute, None, seed=s)
        _sync(device)
        sequential = time.perf_counter() - t0
        nets = [copy.deepcopy(start) for _ in range(n_folds)]
        _sync(device)
        t0 = time.perf_counter()
        fit_folds(nets, stage, images, folds, y, compute, None, seeds)
        _sync(device)
        batched = time.perf_counter() - t0
        imgs = n_folds * per_fold
        print(f"{name:34s} sequential {sequential:7.2f} s ({imgs / sequential:7.1f} img/s) | batched {batched:7.2f} s "
              f"({imgs / batched:7.1f} img/s) | speed-up x{sequential / batched:.2f} | "
              f"load {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cpu-arch", default="scratch:resnet18")
    parser.add_argument("--cpu-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cpu", action="store_true", help="only the CUDA figure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from stagewise.training.autotune import cpu_model

    cpu = cpu_model()
    print(f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"CUDA {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if not args.no_cpu:
        fp32 = resolve_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False))
        run(args.cpu_arch, args.cpu_size, 16, 48, args.folds, fp32, "CPU")
    if torch.cuda.is_available():
        gpu = resolve_compute(ComputeConfig(device="cuda", precision="bf16", channels_last=False))
        run("torchvision:resnet50", 512, 8, 64, args.folds, gpu, "GPU (BPD shape)")
    else:
        print("\nno CUDA device: the GPU figure (torchvision:resnet50, 512 px, batch 8, bf16) is not measured")


if __name__ == "__main__":
    main()
