"""The typed recipe: one YAML file describes one study.

Every field is validated up front so that a typo in a recipe fails in a second with a
message naming the field, instead of an hour into a cross-validation run. The module is
long because it is one thing, the recipe's schema (cohort, data, backbone, head, the stage
kinds, protocol, compute, evaluation) with its loading and overrides; every class in it is
plain data that the rest of stagewise reads.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator


PositiveFloat = Annotated[float, Field(gt=0)]


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the file and the field."""


class _Strict(BaseModel):
    # extra="forbid": a misspelled key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class CohortConfig(_Strict):
    """Where the images and labels are: a CSV manifest, one row per image."""

    manifest: Path
    image: str = "path"
    """Column holding image paths, relative to `root` (default: the manifest's folder)."""
    outcome: str = "outcome"
    """The primary binary outcome: folds are stratified on it, comparisons use it."""
    extra_outcomes: list[str] = []
    """Further binary outcomes learned by the same network (multi-task); empty cells are
    missing labels, masked out of the loss and the metrics."""
    patient: str = "patient"
    site: str | None = None
    clinical: list[str] = []
    baselines: list[str] = []
    """Columns holding routine clinical scores (e.g. an IRDS grade), carried for baselines."""
    root: Path | None = None
    positive: list[str] = ["1", "1.0", "true", "yes", "y", "positive"]
    """Outcome values read as the positive class (compared case-insensitively)."""
    negative: list[str] = ["0", "0.0", "false", "no", "n", "negative"]
    drop_missing_outcome: bool = False
    """Drop rows whose outcome is empty instead of reporting them as errors."""


class DataConfig(_Strict):
    image_size: int = Field(224, ge=8, le=2048)
    resize: Literal["pad", "crop", "stretch"] = "pad"
    """pad: keep aspect ratio, pad to a square; crop: centre-crop to a square; stretch."""


class BackboneConfig(_Strict):
    """A backbone spec such as `xrv:resnet50-res512-all`, `torchvision:resnet50`,
    `timm:resnet18`, `scratch:resnet18` or `file:weights.safetensors`."""

    name: str
    weights: Path | None = None
    """A local weights file that replaces the library download (same format as the library's)."""
    cache_dir: Path | None = None
    """Where the library's own weight cache lives, if not its default."""
    arch: str | None = None
    """For `file:` weights saved as a plain state dict: the architecture, e.g. `torchvision:resnet50`."""

    @field_validator("name")
    @classmethod
    def _has_source(cls, v: str) -> str:
        if ":" not in v:
            raise ValueError(
                f"backbone {v!r} has no source prefix; write e.g. 'torchvision:{v}' "
                "(sources: xrv, torchvision, timm, monai, scratch, bpd, file, run, dual)"
            )
        return v


class HeadConfig(_Strict):
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    hidden: int | None = None
    """Width of a hidden layer (small MLP head); None gives a linear head."""
    fusion: bool = False
    """Join image features with the cohort's clinical columns (imputed and standardised
    inside each training fold) before the head."""
    pretrained: bool = False
    """Start from the head published with the backbone's weights (`bpd:` models and their
    checkpoint files) instead of a new one: a linear head for the one outcome."""

    @model_validator(mode="after")
    def _pretrained_is_linear(self) -> "HeadConfig":
        if self.pretrained and (self.hidden or self.fusion):
            raise ValueError("head.pretrained loads a published linear head: it takes no `hidden` layer and no `fusion`")
        return self


class MixConfig(_Strict):
    alpha: float = Field(1.0, gt=0)
    p: float = Field(0.5, ge=0, le=1)
    """Fraction of batches that are mixed."""


def _ordered_range(v: tuple[float, float], name: str) -> tuple[float, float]:
    if v[0] > v[1]:
        raise ValueError(f"{name} [{v[0]}, {v[1]}]: give [low, high] with low <= high")
    return v


class CropConfig(_Strict):
    """torchvision's RandomResizedCrop on each image: a box of `scale` times the image area
    with aspect ratio in `ratio`, resized back to the image size. A box that does not fit
    (scale above 1 on a square image) falls back to torchvision's centre crop, as in the
    BPD code (scale 0.95-1.05, default ratio)."""

    scale: tuple[PositiveFloat, Annotated[float, Field(gt=0, le=2)]] = (0.95, 1.05)
    ratio: tuple[PositiveFloat, PositiveFloat] = (3 / 4, 4 / 3)
    """Aspect ratio (width / height) range of the box."""
    p: float = Field(1.0, ge=0, le=1)
    """Share of images cropped (torchvision's transform crops every image: 1)."""

    @field_validator("scale", "ratio")
    @classmethod
    def _low_high(cls, v, info):
        return _ordered_range(v, info.field_name)


class BlurConfig(_Strict):
    """torchvision's GaussianBlur on a share `p` of the images, sigma drawn per image."""

    kernel: int = Field(9, ge=3)
    """Kernel size in pixels (odd)."""
    sigma: tuple[PositiveFloat, PositiveFloat] = (0.05, 2.0)
    p: float = Field(0.5, ge=0, le=1)

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"kernel {v}: a Gaussian kernel size is odd (e.g. 9)")
        return v

    @field_validator("sigma")
    @classmethod
    def _low_high(cls, v):
        return _ordered_range(v, "sigma")


class MaskConfig(_Strict):
    """Random pixel masking (the BPD code's RandomMasking): in a share `p` of the images,
    each pixel is set to `value` with probability `fraction`."""

    fraction: float = Field(0.25, gt=0, lt=1)
    p: float = Field(0.1, ge=0, le=1)
    value: float = Field(0.0, ge=0, le=1)
    """Fill on the [0, 1] image scale. The BPD code zeroes pixels after normalising, which is
    0.5 here for torchxrayvision inputs ([-1024, 1024]) and about the ImageNet mean for RGB."""


class AugmentConfig(_Strict):
    flip: bool = False
    rotate: float = Field(0.0, ge=0, le=180)
    """Maximum rotation in degrees."""
    translate: float = Field(0.0, ge=0, le=0.5)
    """Maximum shift as a fraction of the image side."""
    scale: float = Field(0.0, ge=0, le=0.5)
    """Maximum zoom in or out, as a fraction."""
    intensity: float = Field(0.0, ge=0, le=1)
    """Maximum brightness and contrast change, as a fraction."""
    crop: CropConfig | None = None
    """Random resized crop (2D), after flip and rotation."""
    blur: BlurConfig | None = None
    """Gaussian blur (2D), after the crop."""
    mask: MaskConfig | None = None
    """Random pixel masking, last."""

    @property
    def active(self) -> bool:
        return bool(self.flip or self.rotate or self.translate or self.scale or self.intensity) or any(
            c is not None for c in (self.crop, self.blur, self.mask))


class SourceConfig(_Strict):
    """Images (and labels) for a `pretrain` or `ssl` stage other than the study's cohort."""

    manifest: Path
    image: str = "path"
    targets: list[str] = []
    """pretrain: label column(s); one column for classification/regression, several for multilabel."""
    task: Literal["classification", "multilabel", "regression"] = "classification"
    root: Path | None = None
    """Folder that relative image paths start from (default: the manifest's folder)."""


class Stage(_Strict):
    """What every stage kind shares: epochs, batches, optimiser, schedule, input policy.

    A stage kind is a small class of its own (a tagged union on `kind`, as pydantic
    discriminates it), so each carries only the fields that mean something for it and a
    misspelled or misplaced field fails with its name. The training code asks a stage what
    it needs (`members`, `external`, `random_input`) instead of testing `kind`.
    """

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: PositiveFloat | dict[str, PositiveFloat] = 1e-3
    """One LR for the head (and all trainable groups), or one per group name (`head`, `layer4`, ...)."""
    lr_decay: float | None = Field(None, gt=0, le=1)
    """Discriminative LRs as a factor per group, counted down from the head."""
    weight_decay: Annotated[float, Field(ge=0)] | dict[str, Annotated[float, Field(ge=0)]] = 1e-4
    """AdamW weight decay: one value, or one per group name like `lr` (`head` required; groups
    not listed take the head's), e.g. the BPD code's {head: 1e-5, layer4: 1e-4, ...}."""
    schedule: Literal["onecycle", "cosine", "constant"] = "constant"
    pct_start: float = Field(0.3, gt=0, lt=1)
    bn: Literal["adapt", "adapt_once", "freeze"] = "freeze"
    """BatchNorm of the frozen groups. freeze: eval mode, the pretrained statistics. adapt:
    train mode, statistics of every batch (the BPD code's `model.train()`); each forward then
    depends on its batch, so the frozen groups cannot be cached. adapt_once: re-estimated once
    at the start of the stage on the fold's training images (AdaBN, Li et al. 2016), then
    fixed: the same domain adaptation without batch-dependent forwards, so the frozen prefix
    is computed once per fold again (a deviation from `adapt`; its cost is measured in
    benchmarks/RESULTS.md)."""
    augment: AugmentConfig = AugmentConfig()
    cutmix: MixConfig | None = None
    mixup: MixConfig | None = None
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
    activation_bits: Literal[8] | None = None
    """Store activations saved for backward in 8 bits (less memory, approximate gradients)."""
    checkpointing: bool = False
    """Recompute each layer group's activations in backward instead of storing them."""
    rounds: int | None = Field(None, ge=1)
    """Federated arms only: rounds of this stage; `epochs` is then the local epochs per round
    at each site, and thaw fractions count rounds."""

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
    freeze_fraction: float = Field(0.8, ge=0, lt=1)
    """Fraction of candidate weight tensors kept frozen (lowest recent change)."""
    freeze_every: int = Field(10, ge=1)
    """Iterations between re-ranking the tensors."""


class DualStage(Stage):
    """A dual backbone's two branches trained on the original and the augmented stream at once."""

    kind: Literal["dual"] = "dual"

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
    source: SourceConfig

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
    source: SourceConfig | Literal["target"]
    method: Literal["simclr", "byol", "autoencoder"] = "simclr"
    temperature: float = Field(0.1, gt=0)
    """simclr: NT-Xent temperature."""
    projection_dim: int = Field(128, ge=8)
    """Output size of the projection head."""

    @property
    def external(self) -> bool:
        return isinstance(self.source, SourceConfig)


_STAGE_CLASSES = (ProbeStage, ThawStage, FinetuneStage, DynamicStage, DualStage, PretrainStage, SslStage)
_STAGE_KINDS = tuple(c.model_fields["kind"].default for c in _STAGE_CLASSES)
StageConfig = Annotated[Union[_STAGE_CLASSES], Field(discriminator="kind")]
"""One phase of training; `kind` picks the class (probe, thaw, finetune, dynamic, dual,
pretrain, ssl)."""


def parse_stage(data: dict) -> Stage:
    """A stage from a plain dict such as `{"kind": "thaw", "unfreeze": {...}}`."""
    try:
        return TypeAdapter(StageConfig).validate_python(data)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, "stage")) from None


class TuneConfig(_Strict):
    """Nested CV: an inner grouped CV inside each outer training fold picks one grid point."""

    grid: dict[str, list] = Field(min_length=1)
    """Dotted paths into the arm -> candidate values, e.g. `stages.0.lr: [1.0e-3, 3.0e-3]`."""
    inner_folds: int = Field(3, ge=2)

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, v: dict[str, list]) -> dict[str, list]:
        for path, values in v.items():
            if not values:
                raise ValueError(f"grid.{path} has no candidate values")
        return v


class SitesConfig(_Strict):
    """How an arm trains across the cohort's sites (the `site` column); every mode runs on
    the same patient-grouped folds, so the modes can be compared on the same patients."""

    mode: Literal["pooled", "local", "federated"] = "pooled"
    """pooled: all training rows in one place; local: each site trains on its own rows and
    scores its own test patients (and, for cross-site figures, the other sites'); federated:
    each site is a Flower client with its own rows only, a server aggregates."""
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    """The Flower strategy that aggregates (federated only)."""
    strategy_params: dict[str, float] = {}
    """Its parameters, e.g. {proximal_mu: 0.01} for fedprox, {eta: 0.01} for fedadam."""
    bn_stats: Literal["average", "local"] = "average"
    """BatchNorm of the shared groups: averaged like the other weights, or kept at each site
    (FedBN: BatchNorm weights and statistics never leave a site)."""
    min_sites: int | None = Field(None, ge=1)
    """Fewest sites a round may complete with (default: all); fewer replies fail the fold."""
    round_timeout: float = Field(3600.0, gt=0)
    """Seconds the server waits for the sites' replies in a round."""


class ArmConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    """Used as a folder name in the run directory: letters, digits, `_ . + -`."""
    backbone: BackboneConfig
    head: HeadConfig = HeadConfig()
    stages: list[StageConfig] = Field(min_length=1)
    tune: TuneConfig | None = None
    sites: SitesConfig = SitesConfig()

    @model_validator(mode="after")
    def _rounds_only_federated(self) -> "ArmConfig":
        federated = self.sites.mode == "federated"
        for i, stage in enumerate(self.stages):
            if stage.external or isinstance(stage, SslStage):
                if stage.rounds is not None:
                    raise ValueError(f"stage {i} ({stage.kind}) runs centrally before the sites train: no `rounds`")
                if federated and isinstance(stage, SslStage) and not stage.external:
                    raise ValueError(f"stage {i}: an ssl stage on the target is not federated; give it a source manifest")
            elif federated and stage.rounds is None:
                raise ValueError(f"stage {i} ({stage.kind}) of a federated arm needs `rounds` (epochs = local epochs per round)")
            elif not federated and stage.rounds is not None:
                raise ValueError(f"stage {i} ({stage.kind}) has `rounds`, which only a federated arm (sites.mode) uses")
            if federated and stage.epochs == 0:
                raise ValueError(f"stage {i} ({stage.kind}): a federated stage needs epochs >= 1 (local epochs per round)")
            if federated and stage.kind in ("dynamic", "dual"):
                raise ValueError(f"stage {i}: {stage.kind} stages are not federated; use probe, thaw or finetune")
        if federated and self.tune is not None:
            raise ValueError("nested CV (tune) is not available for federated arms")
        if federated and self.head.fusion:
            raise ValueError("clinical fusion heads are not federated (their scaling would pool sites' statistics)")
        return self

    def with_values(self, point: dict) -> "ArmConfig":
        """A copy with dotted paths (`stages.1.epochs`) set, validated; no `tune` of its own."""
        data = self.model_dump(mode="json")
        data["tune"] = None
        for path, value in point.items():
            node, parts = data, path.split(".")
            try:
                for part in parts[:-1]:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                last = int(parts[-1]) if isinstance(node, list) else parts[-1]
                node[last]  # noqa: B018 - the field must exist before it is set
            except (KeyError, IndexError, TypeError, ValueError):
                raise ValueError(f"tune.grid path {path!r} does not name a field of arm {self.name!r}") from None
            node[last] = value
        return ArmConfig.model_validate(data)

    @model_validator(mode="after")
    def _external_stages_first(self) -> "ArmConfig":
        seen_fold_stage = False
        for i, stage in enumerate(self.stages):
            if stage.external and seen_fold_stage:
                raise ValueError(
                    f"stage {i} ({stage.kind} on a source manifest) follows a stage on the cohort; "
                    "stages on source manifests come first (they run once, before cross-validation)"
                )
            seen_fold_stage |= not stage.external
        if not seen_fold_stage:
            raise ValueError("an arm needs at least one stage on the study cohort (probe, thaw, finetune, ...)")
        return self

    @model_validator(mode="after")
    def _grid_paths_exist(self) -> "ArmConfig":
        if self.tune is not None:
            for path, values in self.tune.grid.items():
                self.with_values({path: values[0]})
        return self

    @field_validator("stages", mode="before")
    @classmethod
    def _flatten_stage_lists(cls, v):
        """`stages: [*pretraining, *finetune]`: YAML anchors of stage lists nest; flatten them."""
        if isinstance(v, list):
            return [s for item in v for s in (item if isinstance(item, list) else [item])]
        return v

    @field_validator("backbone", mode="before")
    @classmethod
    def _backbone_from_str(cls, v):
        return {"name": v} if isinstance(v, str) else v


class ProtocolConfig(_Strict):
    kind: Literal["group_kfold", "leave_one_site_out", "balanced_test"] = "group_kfold"
    """group_kfold: repeated stratified group k-fold (recommended). leave_one_site_out.
    balanced_test: the BPD code's folds, to compare like with like, NOT recommended: positive
    patients shuffled into `folds` chunks, each test fold one chunk plus as many negative
    patients taken in turn; negatives beyond the positives' number are never tested, and a
    1:1 test fold reports PPV and NPV at a prevalence the clinic does not have."""
    folds: int = Field(5, ge=2)
    repeats: int = Field(1, ge=1)
    test_images: Literal["all", "first"] = "all"
    """first: each test patient is scored on its first image in manifest order (the BPD
    paper); sort the manifest (e.g. by acquisition time) so that first means earliest."""
    patient_aggregate: Literal["mean", "max", "first"] = "mean"
    """How image scores become a patient score for patient-level metrics."""
    threshold: Literal["youden", "prevalence"] | float = "youden"
    """Decision threshold for balanced accuracy and F1, chosen on the training part of each fold."""
    label_fractions: list[Annotated[float, Field(gt=0, le=1)]] = []
    """Also train each arm on these fractions of each training fold (whole patients, stratified)."""


class ComputeConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: measured at the start of a run, per arm (architecture, image size, batch size):
    the fastest of fp32 and the low precisions the hardware runs natively (bf16; fp16 on
    CUDA), fp32 unless another is 5 % faster; cached per machine (see training/autotune.py)."""
    channels_last: bool | Literal["auto"] = "auto"
    """Memory layout of 2D convolutions; auto: measured with the precision."""
    reuse_frozen: bool = True
    """Compute a frozen, un-augmented network prefix once per image and reuse it."""
    eval_batch_size: int = Field(64, ge=1)
    threads: int | None = None
    save_models: bool = False
    """Save each fold's trained model (safetensors) in the run directory."""
    executor: Literal["local", "ray"] = "local"
    """Where the fits run: `local`, one after another in this process; `ray`, each (unit,
    fold) fit as a task on a Ray cluster, the run directory written by this process alone.
    Neither changes a fold's numbers, and a run started with one resumes with the other."""
    address: str | None = None
    """ray: the cluster to join, `auto` (the one `ray start` made on this machine) or
    `HOST:PORT` of its head; empty: start a Ray instance on this machine for the run."""
    cpus_per_task: int | None = Field(None, ge=1)
    """ray: CPUs each fit reserves, and its torch threads (default: `threads`, else 1). A
    local run gives bit-identical numbers on a CPU when its `threads` is the same."""
    gpus_per_task: float | None = Field(None, ge=0)
    """ray: GPUs each fit reserves (default: 1 where the cluster has GPUs and `device` is not
    cpu, else 0)."""
    max_retries: int = Field(3, ge=0)
    """ray: times a fit is started again when its worker process or node died; a fit that
    raised an error is never retried (the error stops the run)."""

    @model_validator(mode="after")
    def _address_is_for_ray(self) -> "ComputeConfig":
        if self.address is not None and self.executor != "ray":
            raise ValueError(f"address {self.address!r} is the Ray cluster to join: it needs executor: ray")
        return self


class PrimaryComparison(_Strict):
    """`evaluation.primary`: which pair (A vs B) and which test carry the study's claim. The
    corrected resampled t-test on fold AUROCs is the default because a claim about the
    training procedure is a claim across folds (DeLong is conditional on the pooled patients)."""

    a: str
    b: str
    test: Literal["corrected_t", "delong", "wilcoxon"] = "corrected_t"


class EvaluationConfig(_Strict):
    """What turns fold results into evidence: comparisons, intervals, baselines, saliency."""

    compare: list[tuple[str, str]] | None = None
    """Pairs of arm names (`baseline:<column>` and `clinical` included); default: every arm
    against the first arm, and every model arm against every baseline."""
    primary: PrimaryComparison | None = None
    """The study's primary comparison and its test, stated before the results: only its p is
    read as a test of the study's claim (coloured in the report); the other comparisons' p are
    Holm-adjusted for multiplicity. Default: the first comparison, corrected resampled t."""
    bootstrap: int = Field(2000, ge=0)
    """Bootstrap resamples of patients for 95 % CIs; 0 turns them off."""
    clinical_model: bool = True
    """Fit a clinical-only logistic regression on `cohort.clinical` as an arm of its own."""
    saliency: int = Field(4, ge=0)
    """Grad-CAM maps for this many correct and this many wrong test images per arm."""
    recalibrate: Literal["none", "intercept", "slope"] = "none"
    """In-study logistic recalibration of every model unit, per fold: fitted on the patient
    scores of the fold's training part (`intercept`: calibration-in-the-large only; `slope`:
    intercept and slope), applied to its test patients' scores; the report shows the recalibrated calibration
    and decision curves beside the raw ones (meant for CutMix/MixUp arms, whose mixed labels
    pull predictions to the middle). AUROC is unchanged by it. Off (`none`) by default."""
    report: bool = True


class TrackingConfig(_Strict):
    """Experiment tracking in MLflow (stagewise.tracking): one MLflow run per study, nested
    runs per unit and fold. `tracking: mlflow` (or `{}`) turns it on with the defaults."""

    mlflow: bool = True
    """false turns tracking off, even where MLFLOW_TRACKING_URI is set."""
    uri: str | None = None
    """The tracking server or store, e.g. http://127.0.0.1:5000; default: MLFLOW_TRACKING_URI,
    else a local store inside the run directory (mlflow.db, artifacts in mlartifacts/)."""
    experiment: str | None = None
    """The MLflow experiment (default: the recipe's name)."""


class Recipe(_Strict):
    name: str
    seed: int = 0
    cohort: CohortConfig
    data: DataConfig = DataConfig()
    protocol: ProtocolConfig = ProtocolConfig()
    compute: ComputeConfig = ComputeConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig | None = None
    """MLflow tracking; off unless given here or MLFLOW_TRACKING_URI is set."""
    arms: list[ArmConfig] = Field(min_length=1)

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracking_shorthand(cls, v):
        """`tracking: mlflow` (or true) for the defaults, `tracking: false` for off."""
        if v == "mlflow" or v is True:
            return {}
        return {"mlflow": False} if v is False else v

    @model_validator(mode="after")
    def _unique_arms(self) -> "Recipe":
        names = [a.name for a in self.arms]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"arm names must be unique; repeated: {sorted(dup)}")
        if self.protocol.kind == "leave_one_site_out" and not self.cohort.site:
            raise ValueError("protocol.kind leave_one_site_out needs cohort.site")
        # A study's per-site arms need cohort.site: checks.site_column_problems (a deployed
        # federated job runs on one site's manifest at each hospital, with no site column).
        local = [a.name for a in self.arms if a.sites.mode == "local"]
        if local and self.protocol.kind == "leave_one_site_out":
            raise ValueError(f"arms {local}: a held-out site has no local model; local arms need protocol group_kfold "
                             "(their cross-site figures score each site's model on the other sites)")
        published = [a.name for a in self.arms if a.head.pretrained]
        if published and self.cohort.extra_outcomes:
            raise ValueError(f"arms {published} start from a published one-outcome head (head.pretrained), but "
                             "cohort.extra_outcomes asks for more outcomes; remove one of them")
        fused = [a.name for a in self.arms if a.head.fusion]
        if fused and not self.cohort.clinical:
            raise ValueError(f"arms {fused} fuse clinical data (head.fusion) but cohort.clinical lists no columns")
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: the recipe is not valid:"]
    kinds = set(_STAGE_KINDS)
    for e in err.errors():
        loc, kind = list(e["loc"]), None
        for i, part in enumerate(loc):  # pydantic puts the stage kind into the path: take it out
            if part in kinds and (i == 0 or isinstance(loc[i - 1], int)):
                kind = loc.pop(i)
                break
        where = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field (misspelled{f', or not a field of a {kind} stage' if kind else '?'})"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown stage kind; choose one of {', '.join(_STAGE_KINDS)}"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def recipe_from_dict(data: dict, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe given as a dict; relative paths resolve against `base_dir`.

    Top-level keys starting with `x-` are ignored, so a recipe can hold YAML anchors
    (`x-stages: &thaw {...}`) that its arms refer to, as docker-compose files do.
    """
    data = {k: v for k, v in data.items() if not str(k).startswith("x-")}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, source)) from None
    if base_dir is not None:
        sources = [s.source for a in recipe.arms for s in a.stages if s.external]
        for c in [recipe.cohort, *sources]:
            if not c.manifest.is_absolute():
                c.manifest = (base_dir / c.manifest).resolve()
            if c.root is not None and not c.root.is_absolute():
                c.root = (base_dir / c.root).resolve()
        for arm in recipe.arms:
            b = arm.backbone
            for field in ("weights", "cache_dir"):
                value = getattr(b, field)
                if value is not None and not value.expanduser().is_absolute():
                    setattr(b, field, (base_dir / value).resolve())
            source, _, rest = b.name.partition(":")
            if source in ("file", "run") and rest and not Path(rest).expanduser().is_absolute():
                b.name = f"{source}:{(base_dir / rest).resolve()}"
    return recipe


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`protocol.repeats=1`, `arms.0.stages.1.epochs=5`: values parsed as YAML scalars."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise RecipeError(f"--set {item!r}: write FIELD=VALUE, e.g. protocol.repeats=1")
        node, parts = data, path.split(".")
        for i, part in enumerate(parts):
            key = int(part) if isinstance(node, list) and part.isdigit() else part
            where = ".".join(parts[:i]) or "the recipe"
            if isinstance(node, list) and isinstance(key, int) and not -len(node) <= key < len(node):
                raise RecipeError(f"--set {item!r}: index {key} out of range: {where} has {len(node)} "
                                  f"entr{'y' if len(node) == 1 else 'ies'} (0 to {len(node) - 1})")
            if isinstance(node, list) and not isinstance(key, int):
                raise RecipeError(f"--set {item!r}: {where} is a list; write an index (0 to {len(node) - 1}), not {part!r}")
            if not isinstance(node, (list, dict)):
                raise RecipeError(f"--set {item!r}: {where} is a value ({node!r}), it has no field {part!r}")
            if i == len(parts) - 1:
                node[key] = yaml.safe_load(raw)
            else:
                node = node[key] if isinstance(node, list) else node.setdefault(key, {})
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe; paths inside it are relative to the recipe file.
    `overrides` (FIELD=VALUE, dotted) change fields before validation."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with name, cohort and arms")
    data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, source=str(path), base_dir=path.parent.resolve())


def recipe_to_dict(recipe: Recipe) -> dict:
    return recipe.model_dump(mode="json")


def _file_name(value) -> str | None:
    return None if value is None else Path(str(value)).name


def shareable_backbone(name: str) -> str:
    """A backbone spec without the local folders of `file:`/`run:` paths."""
    source, _, rest = name.partition(":")
    return f"{source}:{_file_name(rest.partition('#')[0])}" if source in ("file", "run") else name


def shareable_recipe(data: dict) -> dict:
    """A resolved recipe (as `recipe_to_dict` gives it) as it may leave the site, in a bundle
    or a report: manifests and weight files reduced to their file names, roots and caches
    dropped, so that no local folder (which may name a patient) is shared."""
    data = copy.deepcopy(data)
    if isinstance(data.get("tracking"), dict):  # a server address (or its credentials) stays at the site
        data["tracking"]["uri"] = None
    cohort = data.get("cohort") or {}
    if "manifest" in cohort:
        cohort["manifest"] = _file_name(cohort["manifest"])
    if cohort.get("root") is not None:
        cohort["root"] = None
    for arm in data.get("arms") or []:
        b = arm.get("backbone")
        if isinstance(b, str):
            arm["backbone"] = shareable_backbone(b)
        elif isinstance(b, dict):
            b["name"] = shareable_backbone(str(b.get("name", "")))
            b["weights"] = _file_name(b.get("weights"))
            b["cache_dir"] = None
        for stage in arm.get("stages") or []:
            if isinstance(stage, dict) and isinstance(stage.get("source"), dict):
                stage["source"]["manifest"] = _file_name(stage["source"].get("manifest"))
                stage["source"]["root"] = None
    return data
