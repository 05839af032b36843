"""The `thaw` stage kind: progressive unfreezing of layer groups (each from a fraction of the
stage's epochs, or of its rounds when federated) with discriminative learning rates."""

from __future__ import annotations

from stagewise.recipe import ProbeStage, Stage, ThawStage
from stagewise.training.stages.registry import StageKind, register_stage_kind
from stagewise.training.stages.supervised import fit_supervised


def thaw_round(stage: ThawStage, trainable: list[str]) -> Stage:
    """One federated round of a thaw stage trains exactly the groups its unfreezing has
    reached by that round (counted in rounds), for `epochs` local epochs: a probe stage
    while only the head trains."""
    data = stage.model_dump() | {"rounds": None}
    data.pop("kind")
    data.pop("unfreeze")
    groups = [g for g in trainable if g != "head"]
    if not groups:
        return ProbeStage.model_validate(data)
    return ThawStage.model_validate(data | {"unfreeze": {g: 0.0 for g in groups}})


register_stage_kind(StageKind(
    name="thaw", schema=ThawStage,
    summary="progressive unfreezing of layer groups with discriminative learning rates",
    fit_fold=fit_supervised, round_stage=thaw_round,
    example={"kind": "thaw", "epochs": 20, "batch_size": 32, "lr": 1e-3, "unfreeze": {"layer4": 0.0, "layer3": 0.5}},
))
