"""How close does training get to this machine's arithmetic limit, and where does the rest go?

Three parts, each printed as a table (issue 13, point 3):

1. Matmul peak: large square matmuls (fp32 and bf16) at the thread count given, median of
   repeats, in GFLOP/s. This is the ceiling a convolution network can reach on these cores.
2. Training throughput of stagewise's own networks (`build_arch` + `Network.build`, random
   init, 3-channel torchvision ResNet-18/50 fed the one-channel [0, 1] float16 images a
   cohort holds): forward + backward + AdamW step, batch 16, 224 px, fp32 and bf16 autocast,
   contiguous and channels_last. FLOPs of one step are counted with
   `torch.utils.flop_counter.FlopCounterMode`, so each row says which fraction of the matmul
   peak of its dtype the step reaches: the gap that a better kernel, layout or batch could
   close, as opposed to the gap that is the hardware's.
3. One real `fit_stage` step under `torch.profiler`, to look for waste on the hot path
   (copies, dtype conversions, per-batch Python) that the synthetic loop of part 2 would hide.

    python benchmarks/bench_peak.py [--threads 2] [--steps 4] [--no-profile] [--rows ARCH/DTYPE/LAYOUT ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from stagewise.models import Network, build_arch
from stagewise.recipe import ComputeConfig, FinetuneStage
from stagewise.training.cache import ImageSet
from stagewise.training.autotune import cpu_model
from stagewise.training.compute import resolve_compute
from stagewise.training.engine import fit_stage
from stagewise.training.objectives import BINARY


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def matmul_peak(dtype: torch.dtype, n: int, repeats: int) -> float:
    """Median GFLOP/s of an n x n @ n x n matmul (2 n^3 flops)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def train_step_fn(arch: str, amp: torch.dtype | None, channels_last: bool, batch: int, size: int, fused: bool = True):
    """A closure running one forward + backward + AdamW step of a stagewise Network, as the
    engine does it (float16 images -> device input -> autocast forward -> fp32 loss; AdamW's
    fused kernel, or with fused=False torch's CPU default, a Python loop over parameters)."""
    torch.manual_seed(0)
    net = Network.build(build_arch(arch), dropout=0.1)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4, **({"fused": True} if fused else {}))
    x16 = torch.rand(batch, 1, size, size).half()
    y = (torch.arange(batch) % 2).float().unsqueeze(1)

    def step():
        x = x16.contiguous(memory_format=torch.channels_last) if channels_last else x16
        ctx = torch.autocast("cpu", dtype=amp) if amp is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            out = net(x)
        loss = BINARY.loss(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def step_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def time_steps(step, steps: int, warmup: bool = True) -> float:
    if warmup:
        step()  # warm-up: oneDNN primitive creation, allocator
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_fit_stage(threads: int) -> None:
    """Two batches of a real finetune stage through `fit_stage`, with the compute a recipe's
    defaults resolve to on this CPU (auto precision, channels_last)."""
    from torch.profiler import ProfilerActivity, profile

    compute = resolve_compute(ComputeConfig(device="cpu", threads=threads))
    print(f"\n== profile: fit_stage, torchvision:resnet18, finetune 1 epoch, 2 batches of 16, 224 px, {compute.label} ==")
    torch.manual_seed(0)
    net = Network.build(build_arch("torchvision:resnet18"), dropout=0.1)
    if compute.channels_last:
        net = net.to(memory_format=torch.channels_last)
    x = torch.rand(32, 1, 224, 224).half()
    y = (torch.arange(32) % 2).float().unsqueeze(1)
    images = ImageSet(x, key="bench-peak")
    stage = FinetuneStage(epochs=1, batch_size=16, lr=1e-4)
    fit_stage(net, stage, images, np.arange(16), y, compute, None, seed=0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        fit_stage(net, stage, images, np.arange(32), y, compute, None, seed=0)
        wall = time.perf_counter() - t0
    print(f"wall {wall:.2f} s for 2 steps; threads {torch.get_num_threads()} intra / {torch.get_num_interop_threads()} "
          f"interop; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=48))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    moves = [e for e in events if e.key in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous",
                                             "aten::clone", "aten::index", "aten::expand")]
    share = sum(e.self_cpu_time_total for e in moves) / max(total, 1)
    print(f"data movement / conversion ops (copy_, to, contiguous, clone, index): {100 * share:.1f} % of self CPU time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per row (after one warm-up)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--optimizer", choices=["fused", "loop", "both"], default="fused",
                        help="AdamW kernel: fused (stagewise's since issue 13), loop (torch's CPU default before), both")
    parser.add_argument("--rows", nargs="*", default=None, metavar="ARCH/DTYPE/LAYOUT",
                        help="only these rows, e.g. torchvision:resnet50/bf16/contiguous (default: all 8)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"load average at start: {load()}")

    print("\n== matmul peak (median of 5, GFLOP/s) ==")
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rows = {n: matmul_peak(dtype, n, 5) for n in (1024, 2048, 4096)}
        peak[name] = max(rows.values())
        print(f"{name}: " + ", ".join(f"n={n} {g:7.1f}" for n, g in rows.items()) + f"  -> peak {peak[name]:.1f}")

    print(f"\n== training step: forward + backward + AdamW, batch {args.batch}, {args.size} px (median of {args.steps}) ==")
    print(f"{'network':22s} {'dtype':5s} {'layout':13s} {'GFLOP/step':>10s} {'s/step':>7s} {'img/s':>7s} "
          f"{'GFLOP/s':>8s} {'limit img/s':>11s} {'of peak':>8s}")
    for arch in ("torchvision:resnet18", "torchvision:resnet50"):
        for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
            for channels_last in (False, True):
                layout = "channels_last" if channels_last else "contiguous"
                if args.rows is not None and f"{arch}/{name}/{layout}" not in args.rows:
                    continue
                kernels = {"fused": [True], "loop": [False], "both": [False, True]}[args.optimizer]
                steps = {fused: train_step_fn(arch, amp, channels_last, args.batch, args.size, fused) for fused in kernels}
                flops = step_flops(steps[kernels[0]])
                secs = {fused: [] for fused in kernels}
                for step in steps.values():
                    step()  # warm-up, once per kernel
                for _ in range(args.steps):  # kernels in turn, so a load change hits both alike
                    for fused, step in steps.items():
                        secs[fused].append(time_steps(step, 1, warmup=False))
                for fused in kernels:
                    sec = statistics.median(secs[fused])
                    achieved = flops / sec / 1e9
                    limit = peak[name] * 1e9 / flops * args.batch
                    tag = layout + ("" if args.optimizer == "fused" else (" fused" if fused else " loop"))
                    print(f"{arch:22s} {name:5s} {tag:13s} {flops / 1e9:10.1f} {sec:7.2f} {args.batch / sec:7.1f} "
                          f"{achieved:8.1f} {limit:11.1f} {100 * achieved / peak[name]:7.1f}%", flush=True)
    if not args.no_profile:
        profile_fit_stage(args.threads)
    print(f"\nload average at end: {load()}")


if __name__ == "__main__":
    main()
