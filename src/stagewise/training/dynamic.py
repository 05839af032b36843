"""Freezing decided from training dynamics (SlimFit, Ardakani et al.).

After every optimizer step each trainable candidate tensor is scored by its mean relative
weight change |(W_old - W_new) / W_old|. Every `every` iterations the candidates are ranked
by their last score and the lowest `fraction` is frozen for the next period. A frozen tensor
keeps its stale score, so as the trained tensors settle, frozen ones come back: the frozen
set rotates. The head is never a candidate.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def candidate_tensors(backbone: nn.Module) -> dict[str, nn.Parameter]:
    """Weight tensors with more than one dimension, plus normalisation weights."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    out = {}
    for mname, module in backbone.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() > 1 or (pname == "weight" and isinstance(module, norm_types)):
                out[f"{mname}.{pname}" if mname else pname] = p
    return out


class DynamicFreezer:
    def __init__(self, backbone: nn.Module, fraction: float, every: int):
        self.tensors = candidate_tensors(backbone)
        self.fraction = fraction
        self.every = every
        self.scores = {n: math.inf for n in self.tensors}  # unscored tensors train first
        self.frozen: set[str] = set()
        self._before: dict[str, torch.Tensor] = {}
        self.iteration = 0

    @property
    def n_frozen_target(self) -> int:
        return int(math.floor(self.fraction * len(self.tensors)))

    def apply(self) -> None:
        for n, p in self.tensors.items():
            p.requires_grad_(n not in self.frozen)

    def before_step(self) -> None:
        if self.iteration % self.every == 0 and self.iteration > 0:
            ranked = sorted(self.tensors, key=lambda n: (self.scores[n], n))
            self.frozen = set(ranked[: self.n_frozen_target])
            self.apply()
        self._before = {n: p.detach().clone() for n, p in self.tensors.items() if n not in self.frozen}

    def after_step(self) -> None:
        with torch.no_grad():
            for n, old in self._before.items():
                new = self.tensors[n].detach()
                self.scores[n] = float(((old - new).abs() / old.abs().clamp_min(1e-8)).mean())
        self._before = {}
        self.iteration += 1
