"""The `dynamic` stage kind: freezing decided from training dynamics (SlimFit, Ardakani et al.).

After every optimizer step each trainable candidate tensor is scored by its mean relative
weight change |(W_old - W_new) / W_old|. Every `every` iterations the candidates are ranked
by their last score and the lowest `fraction` is frozen for the next period. A frozen tensor
keeps its stale score, so as the trained tensors settle, frozen ones come back: the frozen
set rotates. The head is never a candidate.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from stagewise.recipe import DynamicStage
from stagewise.training.hooks import StageHooks
from stagewise.training.memory import frozen_weights_save_no_input
from stagewise.training.stages.registry import StageKind, register_stage_kind
from stagewise.training.stages.supervised import fit_supervised


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


class DynamicHooks(StageHooks):
    """SlimFit: re-rank and freeze weight tensors by their recent change; frozen layers keep
    no input activations for backward."""

    def __init__(self, stage: DynamicStage, net):
        super().__init__(stage, net)
        self.freezer = DynamicFreezer(net.backbone, stage.freeze_fraction, stage.freeze_every)
        self.frozen_share: list[float] = []

    def context(self):
        return frozen_weights_save_no_input(self.net.backbone)

    def before_epoch(self) -> None:
        self.freezer.apply()
        self.frozen_share = []

    def before_step(self) -> None:
        self.freezer.before_step()
        self.frozen_share.append(len(self.freezer.frozen) / len(self.freezer.tensors))

    def after_step(self) -> None:
        self.freezer.after_step()

    def epoch_entry(self) -> dict:
        return {"frozen_tensor_share": float(np.mean(self.frozen_share))}


register_stage_kind(StageKind(
    name="dynamic", schema=DynamicStage,
    summary="SlimFit: weight tensors that move least are frozen by a scheduler, their activations not kept",
    fit_fold=fit_supervised, hooks=DynamicHooks,
    example={"kind": "dynamic", "epochs": 10, "batch_size": 32, "lr": 1e-3, "freeze_fraction": 0.5},
))
