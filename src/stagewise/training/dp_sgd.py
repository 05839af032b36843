"""DP-SGD inside the training loop, with Opacus' own pieces: `GradSampleModule` computes
each image's gradient for the parameters that train, `DPOptimizer` clips each to the bound,
sums, adds Gaussian noise and divides by the expected batch size before the wrapped AdamW
steps. Batches are Poisson draws (every training image independently with rate q), the
sampling the accountant's epsilon assumes (Opacus' `DPDataLoader` does the same).

The loop of `engine.fit_stage` stays one loop: with `privacy` it asks this module for its
batches, for the optimizer, and (when a thaw stage unfreezes a group) to hook the newly
trainable layers. Frozen groups never get per-image gradients and never change.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stagewise.models.heads import Network

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)  # noqa: SLF001 - the common base of BatchNorm1d/2d/3d


@dataclass(frozen=True)
class DpSgd:
    """The DP-SGD settings one stage at one site runs with (its noise already chosen)."""

    noise_multiplier: float
    """Noise standard deviation as a multiple of `clip`."""
    clip: float
    """The L2 bound of each image's gradient (inf: no clipping)."""


def poisson_batches(idx: np.ndarray, steps: int, rate: float, g: torch.Generator) -> list[np.ndarray]:
    """`steps` batches, each holding every row of `idx` independently with probability `rate`
    (a batch may be empty: DP-SGD then still takes its noisy step)."""
    return [idx[(torch.rand(len(idx), generator=g) < rate).numpy()] for _ in range(steps)]


def batchnorm_groups(backbone, groups: list[str]) -> list[str]:
    """Those of `groups` that hold a BatchNorm layer (`head`: never; heads have none)."""
    return [g for g in groups if g != "head" and any(isinstance(m, BN_TYPES) for top in backbone.group_modules(g)
                                                     for m in top.modules())]


def stage_batchnorm_problems(stage, backbone) -> list[str]:
    """`stagewise validate`'s refusal of a DP-SGD stage that would train BatchNorm layers."""
    bn = batchnorm_groups(backbone, stage.members(backbone.group_names + ["head"]))
    return [batchnorm_refusal(bn)] if bn else []


def batchnorm_refusal(groups: list[str]) -> str:
    """Why a stage that trains BatchNorm groups cannot run DP-SGD, and what to do instead."""
    return (f"trains {', '.join(groups)}, whose BatchNorm layers run in train mode (each image's output depends on "
            "the other images of its batch, so no per-image gradient exists to clip, and the running statistics "
            "leave the site unnoised); under sites.privacy train only groups without BatchNorm (e.g. a probe "
            "stage, the head), keep bn: freeze for the frozen groups, or use a backbone without BatchNorm")


class PrivateTraining:
    """One stage's DP-SGD state: the DPOptimizer around the stage's AdamW, the per-image
    gradient hooks on the layers that train now, and the steps taken (for the accountant)."""

    def __init__(self, net: Network, optimizer: torch.optim.Optimizer, privacy: DpSgd, n_train: int,
                 steps_per_epoch: int, seed: int, scaler=None, penalty=None):
        from opacus.optimizers import DPOptimizer

        # per-image gradients of a stage whose first trainable layer's input needs no gradient:
        # torch notes that full backward hooks then see only the outputs, which is all Opacus reads
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        if scaler is not None or penalty is not None:
            raise ValueError("DP-SGD runs without float16 loss scaling and without a proximal term (which would be "
                             "added outside the clipped per-image gradients): set compute.precision to bf16 or fp32, "
                             "and a strategy other than fedprox")
        self.net, self.privacy = net, privacy
        self.steps_per_epoch = steps_per_epoch
        self.sample_rate = 1.0 / steps_per_epoch  # as Opacus' DPDataLoader: 1 / batches per epoch
        self.expected_batch_size = max(1, int(n_train * self.sample_rate))
        # no clipping (inf) is a bound no gradient reaches; a finite stand-in keeps Opacus' noise
        # std (noise multiplier x bound) a number when the noise multiplier is 0
        bound = privacy.clip if math.isfinite(privacy.clip) else torch.finfo(torch.float32).max
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=privacy.noise_multiplier, max_grad_norm=bound,
                                     expected_batch_size=self.expected_batch_size, loss_reduction="mean",
                                     generator=torch.Generator().manual_seed(seed + 7919))
        self.steps = 0
        self._module, self._hooked = None, None

    def batches(self, idx: np.ndarray, g: torch.Generator) -> list[np.ndarray]:
        """One epoch's Poisson batches of the training rows."""
        return poisson_batches(idx, self.steps_per_epoch, self.sample_rate, g)

    def track(self) -> None:
        """Hook the layers whose parameters train now (again when a thaw stage unfreezes)."""
        from opacus import GradSampleModule

        hooked = tuple(id(p) for p in self.net.parameters() if p.requires_grad)
        if hooked == self._hooked:
            return
        self.close()
        groups = [g for g, ps in self.net.group_parameters().items() if any(p.requires_grad for p in ps)]
        if bn := batchnorm_groups(self.net.backbone, groups):
            raise ValueError(f"DP-SGD: this stage {batchnorm_refusal(bn)}")
        self._module, self._hooked = GradSampleModule(self.net, batch_first=True, loss_reduction="mean"), hooked

    def step_without_records(self, scheduler=None) -> None:
        """A Poisson draw that holds no image: the step adds noise to a zero sum, as DP-SGD must
        (and the LR schedule moves on, as after any step)."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.steps += 1
        if scheduler is not None:
            scheduler.step()

    def close(self) -> None:
        """Remove Opacus' hooks and the attributes it set on the parameters."""
        if self._module is not None:
            self._module._close()  # noqa: SLF001 - Opacus' own way to detach a GradSampleModule
            self._module, self._hooked = None, None

    def record(self) -> dict:
        """What the accountant needs of this stage: noise, sampling rate, steps taken, clip."""
        return {"noise_multiplier": float(self.privacy.noise_multiplier), "sample_rate": float(self.sample_rate),
                "steps": int(self.steps), "clip": float(self.privacy.clip)}
