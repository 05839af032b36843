"""The typed recipe: one YAML file describes one study.

Every field is validated up front so that a typo in a recipe fails in a second with a
message naming the field, instead of an hour into a cross-validation run. Every class here
is plain data that the rest of stagewise reads; import them from `stagewise.recipe`.

- `base`: the strict pydantic base model (`StrictModel`, unknown keys are errors),
  `RecipeError`, `PositiveFloat` and the formatting of validation errors.
- `cohort`: where images come from: `CohortConfig`, `DataConfig`, `SourceConfig`; the outcome's
  wording (`outcome_phrase`, `task_outcome`, `WORDING_FIELDS`: no fingerprint holds them).
- `network`: `BackboneConfig`, `HeadConfig`.
- `augment`: `MixConfig`, `CropConfig`, `BlurConfig`, `MaskConfig`, `AugmentConfig`.
- `stages`: `Stage`, one class per stage kind, their union `StageConfig` (`STAGE_CLASSES`,
  `STAGE_KINDS`) and `parse_stage`.
- `arms`: `TuneConfig`, `SitesConfig`, `ArmConfig`.
- `strategies`: the Flower strategies `sites.strategy` names and their parameters (`STRATEGIES`).
- `privacy`: `PrivacyConfig` (a federated arm's DP-SGD, `sites.privacy`), `MEANINGLESS_EPSILON`.
- `study`: `ProtocolConfig`, `ComputeConfig`, `PrimaryComparison`, `EvaluationConfig`,
  `TrackingConfig` and the `Recipe` itself.
- `loading`: `load_recipe`, `read_recipe_data`, `recipe_from_dict`, `apply_overrides`, `recipe_to_dict`,
  `shareable_recipe`, `shareable_backbone`.
"""

from __future__ import annotations

from stagewise.errors import StagewiseError
from stagewise.recipe.arms import STRATEGY_NAMES, ArmConfig, SitesConfig, TuneConfig, strategy_text
from stagewise.recipe.augment import AugmentConfig, BlurConfig, CropConfig, MaskConfig, MixConfig
from stagewise.recipe.base import PositiveFloat, RecipeError
from stagewise.recipe.cohort import REPORT_ONLY_FIELDS, WORDING_FIELDS, CohortConfig, DataConfig, SourceConfig, SubgroupConfig, outcome_phrase, task_outcome
from stagewise.recipe.loading import (
    apply_overrides,
    load_recipe,
    read_recipe_data,
    recipe_from_dict,
    recipe_to_dict,
    shareable_backbone,
    shareable_recipe,
)
from stagewise.recipe.network import BackboneConfig, HeadConfig
from stagewise.recipe.privacy import MEANINGLESS_EPSILON, PrivacyConfig
from stagewise.recipe.stages import (
    STAGE_CLASSES,
    STAGE_KINDS,
    DualStage,
    DynamicStage,
    FinetuneStage,
    PretrainStage,
    ProbeStage,
    SslStage,
    Stage,
    StageConfig,
    ThawStage,
    parse_stage,
)
from stagewise.recipe.study import (
    ComputeConfig,
    EvaluationConfig,
    PrimaryComparison,
    ProtocolConfig,
    Recipe,
    THRESHOLD_RULES,
    ThresholdRule,
    TrackingConfig,
)

__all__ = [
    "STAGE_CLASSES",
    "STAGE_KINDS",
    "STRATEGY_NAMES",
    "THRESHOLD_RULES",
    "ThresholdRule",
    "AugmentConfig",
    "ArmConfig",
    "BackboneConfig",
    "BlurConfig",
    "CohortConfig",
    "ComputeConfig",
    "CropConfig",
    "DataConfig",
    "DualStage",
    "DynamicStage",
    "EvaluationConfig",
    "FinetuneStage",
    "HeadConfig",
    "MEANINGLESS_EPSILON",
    "MaskConfig",
    "MixConfig",
    "PositiveFloat",
    "PretrainStage",
    "PrimaryComparison",
    "PrivacyConfig",
    "ProbeStage",
    "ProtocolConfig",
    "Recipe",
    "RecipeError",
    "SitesConfig",
    "SourceConfig",
    "SslStage",
    "Stage",
    "StageConfig",
    "StagewiseError",
    "ThawStage",
    "TrackingConfig",
    "TuneConfig",
    "WORDING_FIELDS",
    "REPORT_ONLY_FIELDS",
    "SubgroupConfig",
    "apply_overrides",
    "load_recipe",
    "read_recipe_data",
    "outcome_phrase",
    "parse_stage",
    "recipe_from_dict",
    "recipe_to_dict",
    "shareable_backbone",
    "shareable_recipe",
    "strategy_text",
    "task_outcome",
]
