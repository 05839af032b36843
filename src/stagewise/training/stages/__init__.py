"""Stage kinds, one module each, registered once at import (see `registry`): probe, thaw,
finetune, dynamic (SlimFit), dual (dual-input-output), pretrain (supervised source task), ssl
(self-supervised). `stage_kind(stage)` answers everything about a recipe stage's kind."""

# imported for their registration, in the recipe's order of kinds
from stagewise.training.stages import probe  # noqa: F401, I001
from stagewise.training.stages import thaw  # noqa: F401
from stagewise.training.stages import finetune  # noqa: F401
from stagewise.training.stages import dynamic  # noqa: F401
from stagewise.training.stages import dual  # noqa: F401
from stagewise.training.stages import pretrain  # noqa: F401
from stagewise.training.stages import ssl  # noqa: F401
from stagewise.training.stages.registry import FoldData, StageKind, list_stage_kinds, register_stage_kind, stage_kind

__all__ = ["FoldData", "StageKind", "list_stage_kinds", "register_stage_kind", "stage_kind"]
