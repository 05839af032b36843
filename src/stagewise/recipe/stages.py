"""The stage kinds: `Stage` (what they share) and one class per `kind` (probe, thaw, finetune,
dynamic, dual, pretrain, ssl), their tagged union `StageConfig` and `parse_stage`."""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator
from stagewise.recipe.augment import AugmentConfig, MixConfig
from stagewise.recipe.base import PositiveFloat, RecipeError, StrictModel, format_errors
from stagewise.recipe.cohort import SourceConfig


class Stage(StrictModel):
    """What every stage kind shares: epochs, batches, optimiser, schedule, input policy.

    A stage kind is a small class of its own (a tagged union on `kind`, as pydantic
    discriminates it), so each carries only the fields that mean something for it and a
    misspelled or misplaced field fails with its name. The training code asks a stage what
    it needs (`members`, `external`, `random_input`) instead of testing `kind`.
    """

    federated: ClassVar[bool] = True
    """Whether a federated arm may use this kind (as Flower rounds at the sites); a kind that
    runs on a source manifest runs centrally before the sites train, whatever this says."""

    epochs: int = Field(10, ge=1)
    """Passes over the training rows (a federated stage: local epochs per round)."""
    batch_size: int = Field(16, ge=1)
    """Training images per optimiser step."""
    lr: PositiveFloat | dict[str, PositiveFloat] = 1e-3
    """One LR for the head (and all trainable groups), or one per group name (`head`, `layer4`, ...)."""
    lr_decay: float | None = Field(None, gt=0, le=1)
    """Discriminative LRs as a factor per group, counted down from the head."""
    weight_decay: Annotated[float, Field(ge=0)] | dict[str, Annotated[float, Field(ge=0)]] = 1e-4
    """AdamW weight decay: one value, or one per group name like `lr` (`head` required; groups
    not listed take the head's), e.g. the BPD code's {head: 1e-5, layer4: 1e-4, ...}."""
    schedule: Literal["onecycle", "cosine", "constant"] = "constant"
    """The LR over the stage's steps: constant; cosine annealing to zero; onecycle (warm-up to `lr`, then cosine down)."""
    pct_start: float = Field(0.3, gt=0, lt=1)
    """onecycle: the share of the stage's steps spent warming up."""
    bn: Literal["adapt", "adapt_once", "freeze"] = "freeze"
    """BatchNorm of the frozen groups. freeze: eval mode, the pretrained statistics. adapt:
    train mode, statistics of every batch (the BPD code's `model.train()`); each forward then
    depends on its batch, so the frozen groups cannot be cached. adapt_once: re-estimated once
    at the start of the stage on the fold's training images (AdaBN, Li et al. 2016), then
    fixed: the same domain adaptation without batch-dependent forwards, so the frozen prefix
    is computed once per fold again (a deviation from `adapt`; its cost is measured in
    benchmarks/RESULTS.md)."""
    augment: AugmentConfig = AugmentConfig()
    """Random changes to each training image (off by default)."""
    cutmix: MixConfig | None = None
    """CutMix: a box of one training image pasted into another, labels mixed by area; unset: off."""
    mixup: MixConfig | None = None
    """MixUp: two training images and their labels blended; unset: off."""
    augment_on: Literal["images", "features"] = "images"
    """images: augmentation and CutMix/MixUp on every training batch's images (the published
    protocols). features: on the output of the groups that are frozen in that epoch (the
    geometric warp, crop and masking with their sizes as fractions of the side, so they scale
    to the feature map; CutMix boxes cut from the map), so that output is computed once per
    fold and reused, not recomputed for every batch. Where nothing is frozen, or a backbone
    cannot be cut between groups, it acts on the images. Blur and intensity act on pixel
    values and are refused here. A deviation from augmenting images (manifold-style
    augmentation); its cost in AUROC is measured in benchmarks/RESULTS.md."""
    balanced_sampling: bool = False
    """Draw each epoch's rows with replacement, inversely to their class's frequency (the BPD code's sampler)."""
    activation_bits: Literal[8] | None = None
    """Store activations saved for backward in 8 bits (less memory, approximate gradients)."""
    checkpointing: bool = False
    """Recompute each layer group's activations in backward instead of storing them."""
    rounds: int | None = Field(None, ge=1)
    """Federated arms only: rounds of this stage; `epochs` is then the local epochs per round
    at each site, and thaw fractions count rounds."""
    site_local: bool = False
    """Federated arms only: personalisation, the paper's site-level fine-tuning. The stage runs
    after the federated stages at each site alone, on its own training rows, for `epochs`
    epochs (no `rounds`); nothing it trains leaves the site, and each site's patients are
    scored by its personalised model."""

    @model_validator(mode="after")
    def _check_lr(self):
        if isinstance(self.lr, dict) and "head" not in self.lr:
            raise ValueError("a per-group `lr` needs a `head` entry")
        if isinstance(self.lr, dict) and self.lr_decay is not None:
            raise ValueError("give either per-group `lr` or `lr_decay`, not both")
        if isinstance(self.weight_decay, dict) and "head" not in self.weight_decay:
            raise ValueError("a per-group `weight_decay` needs a `head` entry")
        if self.augment_on == "features":
            pixel = [k for k in ("blur", "intensity") if getattr(self.augment, k)]
            if pixel:
                raise ValueError(f"augment_on: features cannot apply augment.{' or augment.'.join(pixel)} (they act on "
                                 "pixel values, not on feature maps): remove them or use augment_on: images")
            if self.bn == "adapt":
                raise ValueError("augment_on: features needs frozen groups that compute a fixed function of the image: "
                                 "use bn: freeze or bn: adapt_once, not adapt")
        return self

    @property
    def head_lr(self) -> float:
        return float(self.lr["head"] if isinstance(self.lr, dict) else self.lr)

    def group_weight_decay(self, group: str) -> float:
        """The weight decay of one group (`head`, `layer4`, ...): its own entry, else the head's."""
        wd = self.weight_decay
        return float(wd.get(group, wd["head"]) if isinstance(wd, dict) else wd)

    @property
    def named_groups(self) -> set[str]:
        """Group names this stage refers to (checked against the backbone before training)."""
        return {g for value in (self.lr, self.weight_decay) if isinstance(value, dict) for g in value}

    def members(self, group_names: list[str]) -> list[str]:
        """The groups (from `group_names`, input to head) that train in this stage."""
        return list(group_names)

    def start_epochs(self) -> dict[str, int]:
        """Group -> first epoch in which it trains, for groups that start late."""
        return {}

    @property
    def external(self) -> bool:
        """Trains on a source manifest: the same for every fold, so it runs once per arm."""
        return False

    @property
    def random_input(self) -> bool:
        """True when the stage changes its input at random (augmentation, CutMix, MixUp)."""
        return self.augment.active or self.cutmix is not None or self.mixup is not None


class ProbeStage(Stage):
    """Linear probing: the backbone stays frozen, only the head trains."""

    kind: Literal["probe"] = "probe"
    epochs: int = Field(10, ge=0)
    """0: nothing trains, the network is scored as it starts (with `head.pretrained`, a
    published model evaluated as is on the same folds as the other arms)."""

    def members(self, group_names: list[str]) -> list[str]:
        return ["head"]


class ThawStage(Stage):
    """Progressive unfreezing: groups join training top-down at fractions of the stage's
    epochs; all are in the optimizer from the first step (the BPD paper's schedule)."""

    kind: Literal["thaw"] = "thaw"
    unfreeze: dict[str, float] = Field(min_length=1)
    """Group name -> fraction of the stage's epochs after which it unfreezes."""

    @field_validator("unfreeze")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        for g, f in v.items():
            if not 0.0 <= f < 1.0:
                raise ValueError(f"unfreeze.{g} = {f}: give a fraction of the epochs in [0, 1)")
        return v

    @property
    def named_groups(self) -> set[str]:
        return super().named_groups | set(self.unfreeze)

    def members(self, group_names: list[str]) -> list[str]:
        return [g for g in group_names if g in self.unfreeze] + ["head"]

    def start_epochs(self) -> dict[str, int]:
        # floor: 10 % of 20 epochs is epoch 2, as in the paper
        return {g: math.floor(f * self.epochs + 1e-9) for g, f in self.unfreeze.items()}


class FinetuneStage(Stage):
    """Every layer trains from the first step."""

    kind: Literal["finetune"] = "finetune"


class DynamicStage(Stage):
    """SlimFit: weight tensors frozen from training dynamics (lowest recent change)."""

    kind: Literal["dynamic"] = "dynamic"
    federated: ClassVar[bool] = False  # its freezing schedule is per site and per step: not aggregated
    freeze_fraction: float = Field(0.8, ge=0, lt=1)
    """Fraction of candidate weight tensors kept frozen (lowest recent change)."""
    freeze_every: int = Field(10, ge=1)
    """Iterations between re-ranking the tensors."""


class DualStage(Stage):
    """A dual backbone's two branches trained on the original and the augmented stream at once."""

    kind: Literal["dual"] = "dual"
    federated: ClassVar[bool] = False  # the dual backbone's two streams are not federated

    @model_validator(mode="after")
    def _needs_stream(self) -> "DualStage":
        if not self.augment.active or self.cutmix or self.mixup:
            raise ValueError("a dual stage needs `augment` (the second stream) and no cutmix/mixup")
        if self.augment_on == "features":
            raise ValueError("a dual stage's `augment` is its second input stream: augment_on must be images")
        return self


class PretrainStage(Stage):
    """A supervised source task (classification, multilabel, regression) with a head of its
    own, on a source manifest; runs once per arm before cross-validation."""

    kind: Literal["pretrain"] = "pretrain"
    federated: ClassVar[bool] = False  # a source task runs centrally, once per arm
    source: SourceConfig
    """The source manifest and its label column(s)."""

    @model_validator(mode="after")
    def _targets(self) -> "PretrainStage":
        if not self.source.targets:
            raise ValueError("a pretrain stage needs a source manifest with `targets:` (the source task's labels)")
        if self.source.task != "multilabel" and len(self.source.targets) != 1:
            raise ValueError(f"a {self.source.task} pretrain stage takes one target column")
        return self

    @property
    def external(self) -> bool:
        return True


class SslStage(Stage):
    """Self-supervised training of the whole backbone (SimCLR, BYOL, sparse autoencoder) on
    a source manifest, or on each fold's training images (`source: target`, labels ignored)."""

    kind: Literal["ssl"] = "ssl"
    federated: ClassVar[bool] = False  # on the target it would pool the sites' images; give it a source manifest
    source: SourceConfig | Literal["target"]
    """A source manifest, or `target`: each fold's training images (labels ignored)."""
    method: Literal["simclr", "byol", "autoencoder"] = "simclr"
    """simclr or byol (contrastive, two augmented views per image); autoencoder (a sparse convolutional autoencoder, 2D only)."""
    temperature: float = Field(0.1, gt=0)
    """simclr: NT-Xent temperature."""
    projection_dim: int = Field(128, ge=8)
    """Output size of the projection head."""

    @property
    def external(self) -> bool:
        return isinstance(self.source, SourceConfig)


STAGE_CLASSES = (ProbeStage, ThawStage, FinetuneStage, DynamicStage, DualStage, PretrainStage, SslStage)
STAGE_KINDS = tuple(c.model_fields["kind"].default for c in STAGE_CLASSES)
StageConfig = Annotated[Union[STAGE_CLASSES], Field(discriminator="kind")]
"""One phase of training; `kind` picks the class (probe, thaw, finetune, dynamic, dual,
pretrain, ssl)."""


def parse_stage(data: dict) -> Stage:
    """A stage from a plain dict such as `{"kind": "thaw", "unfreeze": {...}}`."""
    try:
        return TypeAdapter(StageConfig).validate_python(data)
    except ValidationError as err:
        raise RecipeError(format_errors(err, "stage", STAGE_KINDS, StageConfig, data)) from None
