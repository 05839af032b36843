"""Training a supervised stage on a fold's rows: the one loop of `engine.fit_stage`, shared by
every kind that trains the task head with some of the backbone's groups (probe, thaw,
finetune, dynamic, dual); what differs between them is their plan (which groups train when,
`recipe.Stage.members`) and their hooks."""

from __future__ import annotations

from stagewise.training.engine import StageLog, fit_stage
from stagewise.training.stages.registry import FoldData


def fit_supervised(net, stage, data: FoldData, compute, cache, seed: int, on_epoch) -> StageLog:
    return fit_stage(net, stage, data.images, data.rows, data.targets, compute, cache, seed, on_epoch, extra=data.extra)
