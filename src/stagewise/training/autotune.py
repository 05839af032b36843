"""`compute.precision: auto` and `compute.channels_last: auto`: the fastest setting, measured.

Which of fp32, bf16 and channels_last trains fastest depends on the CPU (AVX-512 BF16, AMX or
neither), the GPU, the architecture and the image size, and guesses were wrong: on one AMD
EPYC machine bf16 + channels_last, the old default, ran the demo 2.5x slower than bf16 alone.
So a run times a few full training steps (forward, backward through every group, AdamW) of
each arm's network at its image size and batch size under every candidate setting and keeps
the fastest. Candidates are taken in turn (round robin), so a load change on a shared machine
hits them alike, and each one's time is the median of its steps.

The accuracy guard: low precision is a candidate only where the hardware runs it natively
(bf16 on a CPU with AVX-512 BF16 or AMX, or a GPU that supports it; fp16 on CUDA only, with
loss scaling); a candidate whose loss is not finite is dropped; and fp32 is kept unless
another setting is at least `MARGIN` faster, as a lower precision is not worth its rounding
for less. The choice is cached per machine, architecture, input shape, batch size and
library versions (`STAGEWISE_CACHE_DIR`, default the user's cache directory), so later runs
on the same machine start at once and agree with each other.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from stagewise.version import __version__
from stagewise.models.base import Backbone
from stagewise.models.heads import Network
from stagewise.recipe import ComputeConfig
from stagewise.training.compute import Compute, cpu_has_fast_bf16, resolve_compute
from stagewise.io import atomic_write

log = logging.getLogger("stagewise")

MARGIN = 0.05
"""A setting other than the most exact one must be this much faster (5 %) to be chosen."""
WARMUP_STEPS = 1
TIMED_STEPS = 3


def cache_dir() -> Path:
    """`STAGEWISE_CACHE_DIR`, else $XDG_CACHE_HOME/stagewise, else ~/.cache/stagewise."""
    if os.environ.get("STAGEWISE_CACHE_DIR"):
        return Path(os.environ["STAGEWISE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stagewise"


def needs_measurement(cfg: ComputeConfig) -> bool:
    return cfg.precision == "auto" or cfg.channels_last == "auto"


def candidates(cfg: ComputeConfig) -> list[Compute]:
    """The settings the recipe leaves open, the most exact first (fp32, then bf16, then fp16;
    plain layout before channels_last)."""
    base = resolve_compute(cfg)
    cuda = base.device.type == "cuda"
    if cfg.precision != "auto":
        precisions = [base.amp_dtype]
    else:
        precisions = [None]
        if (torch.cuda.is_bf16_supported() if cuda else cpu_has_fast_bf16()):
            precisions.append(torch.bfloat16)
        if cuda:
            precisions.append(torch.float16)
    layouts = [False, True] if cfg.channels_last == "auto" else [bool(cfg.channels_last)]
    return [Compute(base.device, p, cl, base.reuse_frozen, base.eval_batch_size) for p in precisions for cl in layouts]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` knows)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _machine() -> dict:
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _key(backbone: Backbone, shape: tuple[int, ...], options: list[Compute]) -> dict:
    return {"machine": _machine(), "arch": backbone.arch, "groups": backbone.group_names, "input": list(shape),
            "candidates": [c.label for c in options], "torch": torch.__version__, "stagewise": __version__}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:  # damaged: measured again and rewritten
        log.warning("compute choices cache %s is unreadable (%s); measuring again", path, err)
        return {}


def training_step(backbone: Backbone, shape: tuple[int, ...], c: Compute):
    """One full training step (forward, backward through every group, AdamW) of a copy of
    `backbone` with a new head under `c`, on a fixed random batch of `shape`, as a function
    that runs it and returns the loss (the timing of `compute.threads: auto` uses it too)."""
    net = Network.build(copy.deepcopy(backbone), 1, dropout=0.0).to(c.device)
    if c.channels_last and len(shape) == 4:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **c.optimizer_options)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g).half()
    y = (torch.arange(shape[0]) % 2).float().unsqueeze(1)

    def step() -> float:
        xb, yb = c.to_input(x), y.to(c.device)
        with c.autocast():
            out = net(xb)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if c.device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def time_steps(backbone: Backbone, shape: tuple[int, ...], options: list[Compute]) -> dict[str, float]:
    """Median seconds per training step of each setting (label -> s; inf where the loss was
    not finite), the settings timed in turn."""
    steps = [training_step(backbone, shape, c) for c in options]
    times: dict[str, list[float]] = {c.label: [] for c in options}
    finite = {c.label: True for c in options}
    for i in range(WARMUP_STEPS + TIMED_STEPS):
        for c, step in zip(options, steps):
            if c.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step()
            seconds = time.perf_counter() - t0
            finite[c.label] &= math.isfinite(loss)
            if i >= WARMUP_STEPS:
                times[c.label].append(seconds)
    return {label: statistics.median(t) if finite[label] else math.inf for label, t in times.items()}


def pick(options: list[Compute], seconds: dict[str, float]) -> Compute:
    """The fastest setting, unless the most exact one is within MARGIN of it."""
    fastest = min(options, key=lambda c: seconds[c.label])
    exact = options[0]
    if math.isfinite(seconds[exact.label]) and seconds[exact.label] <= seconds[fastest.label] * (1 + MARGIN):
        return exact
    return fastest


def choose_compute(cfg: ComputeConfig, backbone: Backbone, image_size: int, batch_size: int) -> tuple[Compute, dict]:
    """The setting to train `backbone` with, and a record of the choice (candidates, seconds
    per step, whether it came from the cache) for environment.json and the report."""
    options = candidates(cfg)
    if backbone.spatial_dims == 3:  # channels_last is a 2D layout: the same run for volumes
        options = [c for c in options if not c.channels_last] or [options[0]]
    if len(options) == 1:
        return options[0], setting(options[0]) | {"chosen": options[0].label, "measured": False}
    shape = (max(batch_size, 2), 1) + (image_size,) * backbone.spatial_dims
    key = _key(backbone, shape, options)
    digest = _digest(key)
    path = cache_dir() / "compute-choices.json"
    entry = _read_cache(path).get(digest)
    cached = isinstance(entry, dict) and entry.get("chosen") in {c.label for c in options}
    if not cached:
        seconds = time_steps(backbone, shape, options)
        chosen = pick(options, seconds)
        entry = {"chosen": chosen.label, "seconds_per_step": seconds, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                 "arch": backbone.arch, "input": list(shape)}
        _write_entry(path, digest, entry)
    chosen = next(c for c in options if c.label == entry["chosen"])
    return chosen, {**entry, **setting(chosen), "measured": True, "cached": cached, "candidates": [c.label for c in options],
                    "rule": f"fastest median step; fp32 kept unless another is {MARGIN:.0%} faster"}


def setting(compute: Compute) -> dict:
    """The recipe values that give `compute` again on the same kind of device."""
    return {"device": compute.device.type, "precision": compute.precision, "channels_last": compute.channels_last}


def _write_entry(path: Path, digest: str, entry: dict) -> None:
    """Add one choice to the cache file under a lock (parallel runs on one machine share it);
    a cache that cannot be written only costs a measurement next time."""
    from filelock import FileLock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=30):
            data = _read_cache(path)
            data[digest] = entry
            atomic_write(path, json.dumps(data, indent=1))
    except Exception as err:  # read-only home, lock timeout: the run goes on with its choice
        log.warning("could not save the compute choice to %s (%s)", path, err)


def describe_timings(record: dict) -> str:
    """'fp32 0.41 s, bf16 0.22 s per step (measured)' for the log and the report."""
    seconds = record.get("seconds_per_step")
    if not seconds:
        return "as the recipe says"
    steps = ", ".join(f"{label.split(' ', 1)[1]} {s:.3g} s" for label, s in seconds.items())
    return f"{steps} per training step, {'from the cache' if record.get('cached') else 'measured now'}"
