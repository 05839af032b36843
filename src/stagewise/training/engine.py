"""The training engine: one stage (probe, thaw, finetune) on one fold's training images.

Kept as a plain loop rather than a Lightning Trainer on purpose: a stage resumes the
network from a cached frozen prefix (`forward(x, start=k)`), registers every group that
will ever train in the optimizer from the first step (the BPD paper's progressive
unfreezing, no parameter-group surgery), and must leave frozen weights bit-identical.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from stagewise.models.heads import Network
from stagewise.recipe import Stage
from stagewise.training.adabn import adapt_batchnorm
from stagewise.training.augment import augment_batch, augment_features, mix_batch
from stagewise.training.cache import ImageSet, PrefixCache, resumable_depths
from stagewise.training.compute import Compute
from stagewise.training.dp_sgd import DpSgd, PrivateTraining
from stagewise.training.hooks import hooks_for
from stagewise.training.memory import SavedActivations, peak_memory, reset_peak
from stagewise.training.objectives import BINARY, Objective
from stagewise.training.schedule import stage_optimizer
from stagewise.errors import StagewiseError


class StageError(StagewiseError, ValueError):
    """A stage that does not fit its backbone (unknown group name, ...)."""


@dataclass
class StagePlan:
    """Which groups train at which epoch and with which peak learning rate."""

    lrs: "OrderedDict[str, float]"
    """Groups in the optimizer (from the first step) -> peak LR."""
    start_epoch: dict[str, int]
    """Group -> first epoch (0-based) in which it trains."""
    weight_decay: dict[str, float] = field(default_factory=dict)
    """Group -> AdamW weight decay (the stage's per-group values, else its one value)."""

    def trainable(self, epoch: int) -> list[str]:
        return [g for g in self.lrs if self.start_epoch[g] <= epoch]


def plan_stage(stage: Stage, group_names: list[str]) -> StagePlan:
    """Resolve a stage's groups and discriminative LRs against a network's groups.

    `group_names` runs from the input to the head (stem ... head). Explicit per-group LRs
    win; otherwise `lr_decay` multiplies the LR once per group going down from the head.
    """
    unknown = sorted(stage.named_groups - set(group_names))
    if unknown:
        raise StageError(f"{stage.kind} stage names unknown group(s) {unknown}; this backbone's groups are {group_names}")
    lrs: "OrderedDict[str, float]" = OrderedDict()
    for g in reversed(stage.members(group_names)):  # head first, then down the network
        if isinstance(stage.lr, dict) and g in stage.lr:
            lrs[g] = float(stage.lr[g])
        elif stage.lr_decay is not None:
            depth = len(group_names) - 1 - group_names.index(g)
            lrs[g] = stage.head_lr * stage.lr_decay**depth
        else:
            lrs[g] = stage.head_lr
    start = {g: 0 for g in lrs} | stage.start_epochs()
    return StagePlan(lrs, start, {g: stage.group_weight_decay(g) for g in lrs})


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive batches; a last batch of one image joins the previous (BatchNorm needs two)."""
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        last = chunks.pop()  # popped first: `chunks[-2] = concat(chunks[-2], chunks.pop())` wrote one slot too far
        chunks[-1] = np.concatenate([chunks[-1], last])
    return chunks


def epoch_order(idx: np.ndarray, y: np.ndarray, balanced: bool, g: torch.Generator) -> np.ndarray:
    """One epoch's order of the training rows: a permutation, or with `balanced` an
    inverse-class-frequency draw with replacement (the BPD code's sampler)."""
    if not balanced:
        return idx[torch.randperm(len(idx), generator=g).numpy()]
    classes, counts = np.unique(y, return_counts=True)
    weight = 1.0 / counts[np.searchsorted(classes, y)]
    pick = torch.multinomial(torch.as_tensor(weight, dtype=torch.float64), len(idx), replacement=True, generator=g)
    return idx[pick.numpy()]


def set_bn_policy(net: Network, frozen_groups: list[str], bn: str) -> None:
    """`freeze` and `adapt_once` (after its one re-estimate): frozen groups run in eval mode,
    so their BatchNorm statistics stay fixed; `adapt`: they run in train mode."""
    net.train()
    if bn != "adapt":
        for g in frozen_groups:
            for m in net.backbone.group_modules(g):
                m.eval()


def frozen_prefix(net: Network, trainable: list[str]) -> int:
    """Number of leading backbone groups that do not train this epoch."""
    k = 0
    for g in net.backbone.group_names:
        if g in trainable:
            break
        k += 1
    return k


@dataclass
class StageLog:
    kind: str
    epochs: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    """Peak RSS (and CUDA peak) over the stage, and the peak bytes saved for backward in a step."""
    adapted_batchnorm: int = 0
    """BatchNorm layers whose statistics `bn: adapt_once` re-estimated at the stage's start."""
    privacy: dict | None = None
    """DP-SGD stages: noise multiplier, sampling rate, steps taken and clip (`PrivateTraining.record`)."""

    @property
    def seconds(self) -> float:
        return sum(e["seconds"] for e in self.epochs)


def fit_stage(
    net: Network,
    stage: Stage,
    images: ImageSet,
    train_idx: np.ndarray,
    targets: torch.Tensor,
    compute: Compute,
    cache: PrefixCache | None,
    seed: int,
    on_epoch: Callable[[int, dict], None] | None = None,
    objective: Objective = BINARY,
    extra: torch.Tensor | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    privacy: DpSgd | None = None,
    schedule_part: tuple[int, int] = (0, 1),
) -> StageLog:
    """Train `net` in place for one stage on images[train_idx]; return a per-epoch log.

    `targets` holds one row per cohort image (NaN = missing label), `extra` the clinical
    values a fusion head joins to the image features, `penalty` a term added to every
    step's loss (FedProx's proximal term), `privacy` DP-SGD settings (Poisson batches,
    per-image clipping and noise, `training.dp_sgd`; the log's `privacy` holds what the
    accountant needs). `schedule_part` (i, n): this call runs part i of n equal parts of the
    stage's LR schedule (a federated round of a stage whose schedule spans its rounds,
    `sites.lr_schedule: across_rounds`); (0, 1), the whole schedule, otherwise. The same seed
    gives the same batches, augmentations, dropout masks and noise.
    """
    plan = plan_stage(stage, net.group_names)
    groups = net.group_parameters()
    for p in net.parameters():
        p.requires_grad_(False)
    if stage.epochs == 0:  # a probe of 0 epochs: the network is scored as it starts
        return StageLog(stage.kind)
    steps_per_epoch = len(batches(np.arange(len(train_idx)), stage.batch_size))
    optimizer, scheduler = stage_optimizer(stage, plan.lrs, plan.weight_decay, groups, steps_per_epoch, compute,
                                           schedule_part)
    scaler = compute.grad_scaler()
    private = None
    if privacy is not None:  # Opacus' DPOptimizer around the AdamW, Poisson batches (training/dp_sgd.py)
        private = PrivateTraining(net, optimizer, privacy, len(train_idx), steps_per_epoch, seed, scaler, penalty)
        optimizer = private.optimizer
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    y_train = targets[train_idx, 0].nan_to_num(-1).numpy()
    targets = objective.train_targets(targets)
    hooks = hooks_for(stage, net)
    meter = SavedActivations(net, stage.activation_bits)
    net.backbone.checkpoint_groups = stage.checkpointing
    log = StageLog(stage.kind)
    reset_peak(compute.device)
    if stage.bn == "adapt_once":  # AdaBN on this fold's training images, before the first step
        log.adapted_batchnorm = adapt_batchnorm(net, frozen_prefix(net, plan.trainable(0)), images, train_idx, compute)

    loop = _StageLoop(net, stage, images, train_idx, y_train, targets, extra, compute, cache, objective, penalty,
                      plan, groups, optimizer, scheduler, scaler, g, hooks, meter, private)
    with hooks.context():
        for epoch in range(stage.epochs):
            entry = loop.run_epoch(epoch)
            log.epochs.append(entry)
            if not math.isfinite(entry["loss"]):
                raise FloatingPointError(
                    f"{stage.kind} stage: the loss became {entry['loss']} in epoch {epoch + 1}; lower the learning rate"
                )
            if on_epoch is not None:
                on_epoch(epoch, entry)
    net.backbone.checkpoint_groups = False
    if private is not None:
        private.close()
        log.privacy = private.record()
    log.memory = peak_memory(compute.device) | meter.summary()
    for p in net.parameters():
        p.requires_grad_(False)
    return log


@dataclass
class _EpochInput:
    """Where one epoch's batches start: the groups that train, the frozen prefix `k`, whether
    augmentation acts on its feature maps, and the tensor batches are cut from (the images, or
    the cached prefix output) with the group the forward resumes at."""

    trainable: list[str]
    k: int
    on_features: bool
    source: torch.Tensor
    start: int


@dataclass
class _StageLoop:
    """One stage's training state, so that each part of an epoch is a named method while the
    order of the random draws (on `g`), tensor operations and optimizer and scheduler calls
    stays exactly that of one straight loop: any reordering would change the trained weights."""

    net: Network
    stage: Stage
    images: ImageSet
    train_idx: np.ndarray
    y_train: np.ndarray
    targets: torch.Tensor
    extra: torch.Tensor | None
    compute: Compute
    cache: PrefixCache | None
    objective: Objective
    penalty: Callable[[], torch.Tensor] | None
    plan: StagePlan
    groups: dict
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    scaler: object | None
    g: torch.Generator
    hooks: object
    meter: SavedActivations
    private: PrivateTraining | None = None

    def run_epoch(self, epoch: int) -> dict:
        """Train one epoch; return its log entry (loss, groups, LRs and weight decay at its start)."""
        stage, optimizer = self.stage, self.optimizer
        t0 = time.perf_counter()
        inp = self._epoch_input(epoch)
        lrs_at_start = {pg["name"]: pg["lr"] for pg in optimizer.param_groups}
        decay = {pg["name"]: pg["weight_decay"] for pg in optimizer.param_groups}
        losses = []
        for batch in self._epoch_batches():
            if len(batch) == 0:  # a Poisson draw without images: DP-SGD's noisy step all the same
                self.private.step_without_records(self.scheduler)
                continue
            xb, yb, eb, step_start = self._batch(batch, inp)
            loss = self._step(xb, yb, eb, step_start)
            losses.append(float(loss.detach()))
        entry = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "trainable": inp.trainable,
            "lr": lrs_at_start,
            "weight_decay": decay,
            "resumed_after_groups": inp.start,
            "augmented": ("features" if inp.on_features else "images") if stage.random_input else None,
            "seconds": time.perf_counter() - t0,
        }
        entry |= self.hooks.epoch_entry()
        return entry

    def _epoch_batches(self) -> list[np.ndarray]:
        """A shuffle (or balanced draw) cut into batches; under DP-SGD Poisson draws."""
        if self.private is not None:
            return self.private.batches(self.train_idx, self.g)
        order = epoch_order(self.train_idx, self.y_train, self.stage.balanced_sampling, self.g)
        return batches(order, self.stage.batch_size)

    def _epoch_input(self, epoch: int) -> _EpochInput:
        """Thaw this epoch's groups, set the BatchNorm policy, and choose where batches start:
        the cached output of the frozen prefix when it is a fixed function of the image."""
        net, stage, hooks, cache, compute = self.net, self.stage, self.hooks, self.cache, self.compute
        trainable = self.plan.trainable(epoch)
        for name in self.plan.lrs:
            for p in self.groups[name]:
                p.requires_grad_(name in trainable)
        hooks.before_epoch()
        if self.private is not None:
            self.private.track()
        frozen = [n for n in net.backbone.group_names if n not in trainable]
        set_bn_policy(net, frozen, stage.bn)
        k = frozen_prefix(net, trainable)
        cut = k in resumable_depths(net)
        # augment_on: features -> the frozen groups' output as feature maps, augmented per batch
        on_features = stage.augment_on == "features" and hooks.augments_input and cut and net.backbone.sequential
        fixed = stage.bn != "adapt" and (on_features or not stage.random_input)
        reuse = cache is not None and compute.reuse_frozen and fixed and cut
        source = cache.get(net, k, self.images, compute, maps=on_features) if reuse else self.images.x
        start = k if reuse else 0
        return _EpochInput(trainable, k, on_features, source, start)

    def _batch(self, batch: np.ndarray, inp: _EpochInput):
        """One batch on the device, augmented and mixed (CutMix / MixUp) where the stage says;
        returns (inputs, targets, clinical values or None, group the forward starts at)."""
        stage, compute, g, on_features = self.stage, self.compute, self.g, inp.on_features
        xb = compute.to_input(inp.source[torch.as_tensor(batch)])
        yb = self.targets[batch].to(compute.device)
        eb = None if self.extra is None else self.extra[batch].to(compute.device)
        step_start = inp.start
        if on_features and inp.start == 0:  # no cache: the frozen groups run here, as the cache would
            xb, step_start = _frozen_output(self.net, xb, inp.k, compute), inp.k
        if self.hooks.augments_input and (step_start == 0 or on_features):
            xb = augment_features(xb, stage.augment, g) if on_features else augment_batch(xb, stage.augment, g)
            if eb is None:
                xb, yb = mix_batch(xb, yb, stage.cutmix, stage.mixup, g)
            else:  # a mixed image gets the same mix of clinical values as of labels
                xb, ye = mix_batch(xb, torch.cat([yb, eb], dim=1), stage.cutmix, stage.mixup, g)
                yb, eb = ye[:, : yb.shape[1]], ye[:, yb.shape[1]:]
        return xb, yb, eb, step_start

    def _step(self, xb: torch.Tensor, yb: torch.Tensor, eb: torch.Tensor | None, step_start: int) -> torch.Tensor:
        """One optimizer step (forward, loss, backward, step, schedule); returns the loss."""
        hooks, optimizer, scaler = self.hooks, self.optimizer, self.scaler
        hooks.before_step()
        with self.meter.step():
            with self.compute.autocast():
                logits = hooks.forward(xb, step_start, self.g, eb)
            loss = self.objective.loss(logits, yb)
            if self.penalty is not None:
                loss = loss + self.penalty()
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if self.private is not None:
            self.private.steps += 1
        hooks.after_step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss


@torch.no_grad()
def _frozen_output(net: Network, xb: torch.Tensor, k: int, compute: Compute) -> torch.Tensor:
    """Groups 0..k-1 (frozen, in eval mode) on one batch as feature maps (not pooled): what the
    prefix cache holds for it under `augment_on: features`."""
    with compute.autocast():
        return net.backbone(xb, start=0, stop=k)


@torch.no_grad()
def predict(
    net: Network, images: ImageSet, idx: np.ndarray, compute: Compute, cache: PrefixCache | None,
    objective: Objective = BINARY, extra: torch.Tensor | None = None,
) -> np.ndarray:
    """Outputs (len(idx), n_outputs) in eval mode (probabilities unless regression),
    resumed from a cached prefix if any."""
    net.eval()
    k = cache.deepest_cached(net, images, compute) if cache is not None and compute.reuse_frozen else 0
    source = cache.get(net, k, images, compute) if k else images.x
    out = []
    for i in range(0, len(idx), compute.eval_batch_size):
        batch = torch.as_tensor(idx[i : i + compute.eval_batch_size])
        eb = None if extra is None else extra[batch].to(compute.device)
        with compute.autocast():
            logits = net(compute.to_input(source[batch]), start=k, extra=eb)
        out.append(objective.output(logits).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, net.head.layers[-1].out_features))


def prepare_network(net: Network, compute: Compute) -> Network:
    net = net.to(compute.device)
    if compute.channels_last and net.backbone.spatial_dims == 2:
        net = net.to(memory_format=torch.channels_last)
    return net
