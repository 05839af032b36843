"""What a stage kind adds to the training loop, as one small hook object per kind.

The loop in `engine.fit_stage` is the same for every stage; a kind that needs more (the
SlimFit freezer of a `dynamic` stage, the two input streams of a `dual` stage) says so
through the same few hooks, in the spirit of Lightning's finetuning callbacks and Flower's
`Strategy`: adding a stage kind means adding a recipe class and, if the loop must behave
differently, one hooks class here.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from stagewise.models.heads import Network
from stagewise.recipe import DualStage, DynamicStage, Stage
from stagewise.training.augment import augment_batch
from stagewise.training.dynamic import DynamicFreezer
from stagewise.training.memory import frozen_weights_save_no_input


class StageHooks:
    """A plain supervised stage (probe, thaw, finetune): no extra behaviour."""

    augments_input = True
    """The loop applies the stage's augmentation and CutMix/MixUp to each batch."""

    def __init__(self, stage: Stage, net: Network):
        self.stage, self.net = stage, net

    def context(self) -> contextlib.AbstractContextManager:
        """Held around the whole stage."""
        return contextlib.nullcontext()

    def before_epoch(self) -> None:
        pass

    def forward(self, xb: torch.Tensor, start: int, g: torch.Generator, extra: torch.Tensor | None) -> torch.Tensor:
        return self.net(xb, start=start, extra=extra)

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def epoch_entry(self) -> dict:
        """Extra fields for the epoch's log entry."""
        return {}


class DynamicHooks(StageHooks):
    """SlimFit: re-rank and freeze weight tensors by their recent change; frozen layers keep
    no input activations for backward."""

    def __init__(self, stage: DynamicStage, net: Network):
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


class DualHooks(StageHooks):
    """Dual-input-output training: branch a sees the original batch, branch b an augmented
    copy (the stage's `augment` is the second stream, not a transform of the first)."""

    augments_input = False

    def forward(self, xb, start, g, extra):
        return self.net.head(self.net.backbone.forward_pair(xb, augment_batch(xb, self.stage.augment, g)))


_HOOKS: dict[type, type[StageHooks]] = {DynamicStage: DynamicHooks, DualStage: DualHooks}


def hooks_for(stage: Stage, net: Network) -> StageHooks:
    return _HOOKS.get(type(stage), StageHooks)(stage, net)
