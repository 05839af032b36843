"""The `finetune` stage kind: every layer group and the head train from the first epoch."""

from stagewise.recipe import FinetuneStage
from stagewise.training.stages.registry import StageKind, register_stage_kind
from stagewise.training.stages.supervised import fit_supervised

register_stage_kind(StageKind(
    name="finetune", schema=FinetuneStage, summary="every layer group and the head train from the first epoch",
    fit_fold=fit_supervised,
    example={"kind": "finetune", "epochs": 5, "batch_size": 32, "lr": 1e-4},
))
