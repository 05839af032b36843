"""The `pretrain` stage kind: supervised training of every layer on a source task
(classification, multilabel or regression) with a head of its own, thrown away afterwards;
the study's task head starts fresh in the next stage (AGE2HIE: pretrain -> refine the new
head -> all). Runs once per arm on a source manifest, before cross-validation; never federated."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from stagewise.data.source import SourceData
from stagewise.models.base import Backbone
from stagewise.models.heads import Head, Network
from stagewise.recipe import FinetuneStage, PretrainStage, Stage
from stagewise.training.cache import ImageSet
from stagewise.training.compute import Compute
from stagewise.training.engine import StageLog, fit_stage
from stagewise.training.objectives import Objective
from stagewise.training.stages.registry import StageKind, register_stage_kind


def pretrain_supervised(
    backbone: Backbone, stage: PretrainStage, images: ImageSet, source: SourceData, compute: Compute,
    seed: int, on_epoch: Callable[[int, dict], None] | None = None,
) -> StageLog:
    """Train every layer on the source task (classification, multilabel or regression)."""
    task = stage.source.task
    targets = source.targets.clone()
    if task == "classification":
        objective = Objective("multiclass", source.n_outputs)
    elif task == "multilabel":
        objective = Objective("binary")
    else:  # standardise: brain ages of 0-97 years would otherwise dominate the first steps
        mean, std = np.nanmean(targets.numpy(), 0), np.nanstd(targets.numpy(), 0) + 1e-8
        targets = (targets - torch.from_numpy(mean)) / torch.from_numpy(std)
        objective = Objective("regression")
    torch.manual_seed(seed)
    net = Network(backbone, Head(backbone.feature_dim, source.n_outputs, dropout=0.0)).to(compute.device)
    finetune = FinetuneStage.model_validate(stage.model_dump(include=set(Stage.model_fields)))
    return fit_stage(net, finetune, images, np.arange(len(images)), targets, compute, None, seed,
                     on_epoch=on_epoch, objective=objective)


register_stage_kind(StageKind(
    name="pretrain", schema=PretrainStage,
    summary="supervised source task on a source manifest, once per arm before cross-validation",
    fit_source=lambda backbone, stage, images, source, compute, seed, on_epoch: pretrain_supervised(
        backbone, stage, images, source, compute, seed, on_epoch),
    example={"kind": "pretrain", "epochs": 5, "batch_size": 32, "lr": 3e-3,
             "source": {"manifest": "source.csv", "targets": ["age"], "task": "regression"}},
))
