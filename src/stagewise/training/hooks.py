"""What a stage kind adds to the training loop, as one small hook object per kind.

The loop in `engine.fit_stage` is the same for every stage; a kind that needs more (the
SlimFit freezer of a `dynamic` stage, the two input streams of a `dual` stage) says so
through the same few hooks, in the spirit of Lightning's finetuning callbacks and Flower's
`Strategy`: a kind whose loop must behave differently gives its `StageKind` (one module of
`training/stages/`) a subclass of `StageHooks`.
"""

from __future__ import annotations

import contextlib

import torch

from stagewise.models.heads import Network
from stagewise.recipe import Stage
from stagewise.training.stages.registry import stage_kind


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


def hooks_for(stage: Stage, net: Network) -> StageHooks:
    """The hooks of the stage's registered kind (`training/stages/`), plain ones by default."""
    return (stage_kind(stage).hooks or StageHooks)(stage, net)
