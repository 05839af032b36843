"""Memory: what a stage keeps for backward, and how frozen layers stop paying for it.

PyTorch's convolution and linear nodes save their input even when only the input gradient
is needed (a frozen weight above a trainable layer), so freezing alone saves little
activation memory. `frozen_weights_save_no_input` swaps such layers to autograd functions
that keep only the weight, which is all the input gradient needs (SlimFit's observation).
`SavedActivations` counts the bytes autograd keeps, and can store them in 8 bits.
"""

from __future__ import annotations

import contextlib
import os
import resource

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        dtype = _compute_dtype(x)
        w = weight.to(dtype)
        ctx.save_for_backward(w)
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation, groups)
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x.to(dtype), w, None if bias is None else bias.to(dtype), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        shape, in_dtype, stride, padding, dilation, groups = ctx.conf
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(shape, w, grad.to(w.dtype), stride, padding, dilation, groups).to(in_dtype)
        if ctx.needs_input_grad[2]:  # a trainable bias needs only the output gradient
            gb = grad.sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
        return gx, None, gb, None, None, None, None


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = _compute_dtype(x)
        w = weight.to(dtype)
        ctx.save_for_backward(w)
        ctx.in_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        gx = (grad.to(w.dtype) @ w).to(ctx.in_dtype) if ctx.needs_input_grad[0] else None
        gb = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return gx, None, gb


def _frozen_aware_forward(module: nn.Module, original):
    def forward(x):
        # A frozen weight needs no input for its gradient; a trainable bias needs none either.
        if module.weight.requires_grad or not torch.is_grad_enabled():
            return original(x)
        if isinstance(module, nn.Conv2d):
            return _FrozenConv2d.apply(x, module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups)
        return _FrozenLinear.apply(x, module.weight, module.bias)

    return forward


@contextlib.contextmanager
def frozen_weights_save_no_input(model: nn.Module):
    """While active, a Conv2d/Linear whose weight is frozen saves no input (its bias may train)."""
    patched = []
    for m in model.modules():
        plain_conv = isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
        if plain_conv or isinstance(m, nn.Linear):
            m.forward = _frozen_aware_forward(m, m.forward)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class SavedActivations:
    """Counts bytes autograd saves for backward per step (the activation memory), and with
    `bits=8` stores large saved activations as int8 with one scale per tensor."""

    def __init__(self, model: nn.Module, bits: int | None = None):
        self.bits = bits
        self.param_ptrs = {p.data_ptr() for p in model.parameters()}
        self.step_bytes = 0
        self.steps: list[int] = []

    def _pack(self, t: torch.Tensor):
        quantize = (
            self.bits == 8 and t.is_floating_point() and t.numel() >= 4096 and t.data_ptr() not in self.param_ptrs
            and t.dim() >= 2
        )
        if quantize:
            scale = t.detach().abs().amax().float().clamp_min(1e-12) / 127
            q = (t.detach().float() / scale).round().clamp(-127, 127).to(torch.int8)
            self.step_bytes += q.numel()
            return ("q8", q, scale, t.dtype)
        if t.data_ptr() not in self.param_ptrs:
            self.step_bytes += t.numel() * t.element_size()
        return ("raw", t)

    @staticmethod
    def _unpack(packed):
        if packed[0] == "q8":
            _, q, scale, dtype = packed
            return (q.float() * scale).to(dtype)
        return packed[1]

    @contextlib.contextmanager
    def step(self):
        """Wrap one forward + backward; the bytes of each step are kept."""
        self.step_bytes = 0
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield
        self.steps.append(self.step_bytes)

    def summary(self) -> dict[str, int]:
        """Peak and median bytes over steps (the median is the steady state of a dynamic stage)."""
        if not self.steps:
            return {}
        return {"saved_activation_peak_bytes": max(self.steps), "saved_activation_median_bytes": int(np.median(self.steps))}


def reset_peak_rss() -> None:
    """Linux lets a process reset its peak RSS (VmHWM), so each stage gets its own peak."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if os.name == "posix" else 0


def reset_peak(device: torch.device) -> None:
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, int]:
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out
