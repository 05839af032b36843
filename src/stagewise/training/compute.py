"""Device, precision and memory layout, resolved once from the recipe."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from stagewise.recipe import ComputeConfig


@dataclass(frozen=True)
class Compute:
    device: torch.device
    amp_dtype: torch.dtype | None
    """Autocast dtype; None runs in float32."""
    channels_last: bool
    reuse_frozen: bool
    eval_batch_size: int

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> "torch.amp.GradScaler | None":
        """float16 gradients underflow without loss scaling; bfloat16 needs none."""
        if self.amp_dtype == torch.float16 and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None

    @property
    def optimizer_options(self) -> dict:
        """AdamW's fused kernel on CPU and CUDA: one pass over all tensors instead of a Python
        loop per parameter (torch's default on a CPU), the same update to rounding (~1e-8)."""
        return {"fused": True} if self.device.type in ("cpu", "cuda") else {}

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    @property
    def label(self) -> str:
        return f"{self.device.type} {self.precision}{' channels_last' if self.channels_last else ''}"


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bfloat16 runs natively (torch's own capability checks)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers moved: stay in float32
        return False


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: containers, taskset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def busy_machine_note(threads: int | None, load: float | None = None, cpus: int | None = None) -> str | None:
    """A sentence when other work already holds CPUs that torch's threads need (more than one
    thread, and a load average of at least one core more than the CPUs those threads leave
    free), else None.

    OpenMP threads wait for each other at the end of every parallel operation, so one thread
    sharing its core with another job holds up all of them: on 2 cores, one fold with 2 threads
    took 1.8x as long as with 1 thread beside one busy process, 3.5x beside two
    (benchmarks/bench_threads.py). `load` (default: the 1-minute load average) and `cpus`
    (default: the CPUs this process may use) are the machine's."""
    if load is None:
        if not hasattr(os, "getloadavg"):
            return None
        load = os.getloadavg()[0]
    cpus = cpus or usable_cpus()
    n = threads or torch.get_num_threads()
    if n <= 1 or load < cpus - min(n, cpus) + 1:
        return None
    return (f"other work holds CPUs before training starts (load average {load:.1f} on {cpus} CPUs) and torch would "
            f"run {n} threads, which then wait on each other; `compute.threads: 1` or `auto` (or fewer jobs at once) can be "
            "several times faster here")


def resolve_compute(cfg: ComputeConfig) -> Compute:
    """The recipe's device and settings without measuring: `auto` precision is bfloat16 where
    the hardware runs it natively (else fp16 on CUDA, fp32 on a CPU) and `auto` channels_last
    is off. A study measures instead (`autotune.choose_compute`); this is the answer where
    nothing is measured (a federated site's round)."""
    if isinstance(cfg.threads, int):  # `auto` is chosen by a study (training/threads.py)
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device is cuda but no CUDA GPU is visible; use device: auto or cpu")
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    precision = cfg.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise RuntimeError("compute.precision fp16 is for CUDA; on a CPU use bf16 or fp32")
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Compute(device, amp, cfg.channels_last is True, cfg.reuse_frozen, cfg.eval_batch_size)
