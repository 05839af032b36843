"""The `dual` stage kind: dual-input-output training of a dual backbone (`dual:<spec>`):
branch a sees the original batch, branch b an augmented copy, and both outputs feed the
head. Refused for a backbone without `forward_pair`; never federated."""

from __future__ import annotations

from stagewise.recipe import DualStage
from stagewise.training.augment import augment_batch
from stagewise.training.hooks import StageHooks
from stagewise.training.stages.registry import StageKind, register_stage_kind
from stagewise.training.stages.supervised import fit_supervised


class DualHooks(StageHooks):
    """Dual-input-output training: branch a sees the original batch, branch b an augmented
    copy (the stage's `augment` is the second stream, not a transform of the first)."""

    augments_input = False

    def forward(self, xb, start, g, extra):
        return self.net.head(self.net.backbone.forward_pair(xb, augment_batch(xb, self.stage.augment, g)))


def dual_backbone_problems(stage: DualStage, backbone, name: str) -> list[str]:
    if not hasattr(backbone, "forward_pair"):
        return [f"needs a dual backbone (dual:<spec>), not {name}"]
    return []


register_stage_kind(StageKind(
    name="dual", schema=DualStage,
    summary="dual-input-output training: original and augmented streams through a dual backbone",
    fit_fold=fit_supervised, hooks=DualHooks, backbone_problems=dual_backbone_problems,
    example={"kind": "dual", "epochs": 10, "batch_size": 32, "lr": 1e-3, "augment": {"rotate": 15, "translate": 0.1}},
))
