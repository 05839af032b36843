"""The `probe` stage kind: a linear (or small MLP) head on a frozen backbone; federated, it
sends the head only."""

from stagewise.recipe import ProbeStage
from stagewise.training.stages.registry import StageKind, register_stage_kind
from stagewise.training.stages.supervised import fit_supervised

register_stage_kind(StageKind(
    name="probe", schema=ProbeStage, summary="the head alone on a frozen backbone (linear probing)",
    fit_fold=fit_supervised,
    example={"kind": "probe", "epochs": 10, "batch_size": 32, "lr": 3e-3},
))
