"""Fold batching: K folds of one arm trained together for one stage, as one vmapped network.

Why: a small clinical cohort gives each fold a few hundred images, so one fold's batch of
8-16 leaves a GPU mostly idle and the K folds of an arm run one after another. Stacking the
K networks' weights (`torch.func.stack_module_state`) and running the backbone under
`torch.vmap` turns K small convolutions into one grouped one, so K folds cost about one.

What it must not change is the numbers: each fold is trained as `engine.fit_stage` would
train it alone, with its own seed. So

- each fold draws its own batches in the engine's order (`engine.batches` over the same
  epoch permutation from its own generator); folds of different sizes simply have a
  different last batch or step count: a step runs the folds that have a batch at that
  step, grouped by batch size (BatchNorm statistics must be over that fold's batch alone);
- each fold has its own `torch.optim.AdamW` and LR scheduler, over *views* of its slice of
  the stacked weights, so learning rates, betas (OneCycle cycles them), step counts and
  groups that join late are the engine's own code, not a re-implementation;
- BatchNorm running statistics are stacked buffers, updated in place per fold under vmap
  (`functional_call` swaps them in; no `replace_all_batch_norm_modules_` is needed, since
  each fold's buffers are its own batched slice);
- the head runs per fold outside vmap, with that fold's global RNG state swapped in, so its
  dropout masks are the ones the fold would draw alone (vmap cannot give one generator per
  fold); the backbone runs with `randomness="error"`, so a backbone that draws random
  numbers is refused rather than silently trained differently;
- frozen groups are never written: their stacked copies are untouched and copied back.

Scope: plain probe/thaw/finetune stages without augmentation, CutMix/MixUp, 8-bit
activations, checkpointing, fp16 loss scaling or a penalty term; other stages are refused
with `FoldBatchError`. The result is `fit_stage`'s within float rounding (grouped
convolutions sum in another order), not bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from stagewise.models.heads import Network
from stagewise.recipe import FinetuneStage, ProbeStage, Stage, ThawStage
from stagewise.training.cache import ImageSet, PrefixCache, resumable_depths
from stagewise.training.compute import Compute
from stagewise.training.engine import (
    BINARY, Objective, StageError, StageLog, batches, epoch_order, frozen_prefix, plan_stage, set_bn_policy,
)
from stagewise.training.memory import peak_memory, reset_peak

BATCHABLE = (ProbeStage, ThawStage, FinetuneStage)


class FoldBatchError(StageError):
    """A stage or set of networks that fold batching cannot train exactly as `fit_stage` would."""


def check_batchable(stage: Stage, compute: Compute | None = None) -> None:
    """Refuse what fold batching would train differently from `fit_stage` (or not at all)."""
    if type(stage) not in BATCHABLE:
        raise FoldBatchError(
            f"fold batching trains plain probe/thaw/finetune stages; a {stage.kind} stage has its own training "
            "hooks (run its folds one by one with fit_stage)")
    reasons = []
    if stage.augment.active:
        reasons.append("augmentation")
    if stage.cutmix is not None or stage.mixup is not None:
        reasons.append("CutMix/MixUp")
    if stage.activation_bits is not None:
        reasons.append("8-bit saved activations")
    if stage.checkpointing:
        reasons.append("activation checkpointing")
    if stage.bn not in ("adapt", "freeze"):
        reasons.append(f"bn: {stage.bn} (a per-fold re-estimate before the first step)")
    if compute is not None and compute.grad_scaler() is not None:
        reasons.append("fp16 loss scaling")
    if reasons:
        raise FoldBatchError(
            f"fold batching does not support {', '.join(reasons)} (the {stage.kind} stage would draw or store "
            "per-fold state it cannot reproduce); run its folds one by one with fit_stage")


class _FoldRng:
    """One fold's global RNG stream (what dropout draws from), swapped in around its head."""

    def __init__(self, seed: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        torch.manual_seed(seed)
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None

    def __enter__(self):
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)

    def __exit__(self, *exc):
        self.cpu_state = torch.get_rng_state()
        if self.cuda:
            self.cuda_state = torch.cuda.get_rng_state(self.device)


def _check_same_architecture(nets: Sequence[Network]) -> None:
    if len({id(n) for n in nets}) != len(nets):
        raise FoldBatchError("fold batching needs one network object per fold (pass copies, not the same network twice)")
    ref = [(n, tuple(t.shape), t.dtype) for n, t in nets[0].state_dict().items()]
    for i, net in enumerate(nets[1:], start=1):
        if [(n, tuple(t.shape), t.dtype) for n, t in net.state_dict().items()] != ref or net.n_extra != nets[0].n_extra:
            raise FoldBatchError(f"fold batching needs one architecture; network {i} differs from network 0")


def _subset(stacked: dict[str, torch.Tensor], folds: list[int], k_all: int) -> dict[str, torch.Tensor]:
    """The rows `folds` of each stacked tensor: the tensors themselves for all folds, a view
    for a contiguous run (in-place BatchNorm updates then land in the stacked buffers), else a
    copy (whose buffers the caller writes back)."""
    if len(folds) == k_all:
        return stacked
    if folds == list(range(folds[0], folds[-1] + 1)):
        return {n: t[folds[0] : folds[-1] + 1] for n, t in stacked.items()}
    index = torch.as_tensor(folds, device=next(iter(stacked.values())).device)
    return {n: t.index_select(0, index) for n, t in stacked.items()}


def fit_folds(
    nets: Sequence[Network],
    stage: Stage,
    images: ImageSet,
    train_idx: Sequence[np.ndarray],
    targets: torch.Tensor,
    compute: Compute,
    cache: PrefixCache | None,
    seeds: Sequence[int],
    objective: Objective = BINARY,
    extra: torch.Tensor | None = None,
    on_epoch: Callable[[int, int, dict], None] | None = None,
) -> list[StageLog]:
    """Train `nets[k]` in place for one stage on images[train_idx[k]] with seed `seeds[k]`,
    all K together; return one `StageLog` per fold, as K calls of `fit_stage` would.

    The networks share one architecture and may hold different weights (one arm's folds after
    a first stage). `on_epoch(fold, epoch, entry)` is called after each epoch for each fold.
    An epoch's `seconds` is the batched epoch's wall time split evenly over the K folds.
    """
    nets = list(nets)
    n_folds = len(nets)
    if not n_folds or len(train_idx) != n_folds or len(seeds) != n_folds:
        raise FoldBatchError(f"fold batching needs as many training index sets and seeds as networks "
                             f"({n_folds} networks, {len(train_idx)} index sets, {len(seeds)} seeds)")
    check_batchable(stage, compute)
    _check_same_architecture(nets)
    template = nets[0]
    plan = plan_stage(stage, template.group_names)
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(False)
    logs = [StageLog(stage.kind) for _ in nets]
    if stage.epochs == 0:
        return logs

    params, buffers = stack_module_state(nets)  # new (K, ...) tensors; the networks keep theirs
    name_of = {id(p): n for n, p in template.named_parameters()}
    group_names = {g: [name_of[id(p)] for p in ps] for g, ps in template.group_parameters().items()}
    bb = {"params": {}, "buffers": {}}
    head = {"params": {}}
    for n, t in params.items():
        (bb["params"] if n.startswith("backbone.") else head["params"])[n.partition(".")[2]] = t
    for n, t in buffers.items():
        if not n.startswith("backbone."):
            raise FoldBatchError(f"fold batching expects buffers only in the backbone; found {n}")
        bb["buffers"][n.partition(".")[2]] = t

    # Per fold: its own AdamW and schedule over views of its slice of the stacked weights.
    views = [{n: params[n].detach()[k] for n in params} for k in range(n_folds)]
    optimizers, schedulers, steps_per_epoch = [], [], []
    for k in range(n_folds):
        opt = torch.optim.AdamW([
            {"params": [views[k][n] for n in group_names[g]], "lr": lr, "weight_decay": plan.weight_decay[g], "name": g}
            for g, lr in plan.lrs.items()], **compute.optimizer_options)
        n_steps = len(batches(np.arange(len(train_idx[k])), stage.batch_size))
        total = n_steps * stage.epochs
        sched = None
        if stage.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=list(plan.lrs.values()), total_steps=total, pct_start=stage.pct_start, anneal_strategy="cos")
        elif stage.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        optimizers.append(opt)
        schedulers.append(sched)
        steps_per_epoch.append(n_steps)

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    rngs = [_FoldRng(int(s), compute.device) for s in seeds]
    y_train = [targets[idx, 0].nan_to_num(-1).numpy() for idx in train_idx]
    train_targets = objective.train_targets(targets)
    n_groups = len(template.backbone.group_names)
    reset_peak(compute.device)

    def backbone_fn(p, b, x, start):
        return functional_call(template.backbone, (p, b), (x,), {"start": start})

    for epoch in range(stage.epochs):
        t0 = time.perf_counter()
        trainable = plan.trainable(epoch)
        trainable_names = {n for g in trainable for n in group_names[g]}
        for g in plan.lrs:
            for n in group_names[g]:
                params[n].requires_grad_(n in trainable_names)
        frozen = [g for g in template.backbone.group_names if g not in trainable]
        set_bn_policy(template, frozen, stage.bn)
        k_prefix = frozen_prefix(template, trainable)
        reuse = (cache is not None and compute.reuse_frozen and not stage.random_input and stage.bn == "freeze"
                 and k_prefix in resumable_depths(template))
        # The prefix is frozen since the stage began, so each network's own (unchanged) weights key the cache.
        sources = [cache.get(net, k_prefix, images, compute) if reuse else images.x for net in nets]
        start = k_prefix if reuse else 0
        lrs_at_start = [{pg["name"]: pg["lr"] for pg in opt.param_groups} for opt in optimizers]
        decay = [{pg["name"]: pg["weight_decay"] for pg in opt.param_groups} for opt in optimizers]
        fold_batches = [batches(epoch_order(train_idx[k], y_train[k], stage.balanced_sampling, gens[k]), stage.batch_size)
                        for k in range(n_folds)]
        losses: list[list[float]] = [[] for _ in nets]
        for step in range(max(len(b) for b in fold_batches)):
            by_size: dict[int, list[int]] = {}
            for k in range(n_folds):
                if step < len(fold_batches[k]):
                    by_size.setdefault(len(fold_batches[k][step]), []).append(k)
            for t in params.values():
                t.grad = None
            for folds in by_size.values():
                _train_group(template, folds, n_folds, step, fold_batches, sources, train_targets, extra, compute,
                             objective, bb, head, start, n_groups, rngs, losses, backbone_fn)
            for folds in by_size.values():
                for k in folds:
                    for n, v in views[k].items():
                        v.grad = None if params[n].grad is None else params[n].grad[k]
                    optimizers[k].step()
                    if schedulers[k] is not None:
                        schedulers[k].step()
        seconds = (time.perf_counter() - t0) / n_folds
        for k in range(n_folds):
            entry = {"epoch": epoch, "loss": float(np.mean(losses[k])), "trainable": trainable, "lr": lrs_at_start[k],
                     "weight_decay": decay[k], "resumed_after_groups": start, "seconds": seconds,
                     "batched_folds": n_folds}
            logs[k].epochs.append(entry)
            if not math.isfinite(entry["loss"]):
                raise FloatingPointError(f"{stage.kind} stage, fold {k}: the loss became {entry['loss']} in epoch "
                                         f"{epoch + 1}; lower the learning rate")
            if on_epoch is not None:
                on_epoch(k, epoch, entry)

    with torch.no_grad():
        for k, net in enumerate(nets):
            for n, p in net.named_parameters():
                p.copy_(params[n][k])
            for n, b in net.named_buffers():
                b.copy_(buffers[n][k])
            set_bn_policy(net, frozen, stage.bn)  # the modes fit_stage leaves a network in
            net.backbone.checkpoint_groups = False
    memory = peak_memory(compute.device)
    for log in logs:
        log.memory = dict(memory)
    return logs


def _train_group(template, folds, n_folds, step, fold_batches, sources, train_targets, extra, compute, objective,
                 bb, head, start, n_groups, rngs, losses, backbone_fn) -> None:
    """Forward and backward of one step for the folds `folds`, whose batches have one size."""
    rows = [torch.as_tensor(fold_batches[k][step]) for k in folds]
    xb = compute.to_input(torch.stack([sources[k][r] for k, r in zip(folds, rows)]))
    p_bb, b_bb = _subset(bb["params"], folds, n_folds), _subset(bb["buffers"], folds, n_folds)
    p_head = _subset(head["params"], folds, n_folds)
    with compute.autocast():
        if start < n_groups or xb.dim() > 3:  # Network.forward: pooled features skip the backbone
            try:
                feats = vmap(backbone_fn, in_dims=(0, 0, 0, None), randomness="error")(p_bb, b_bb, xb, start)
            except RuntimeError as err:
                if "random" not in str(err):
                    raise
                raise FoldBatchError(f"{template.backbone.arch} draws random numbers in its forward (dropout, drop "
                                     "path); fold batching cannot give each fold its own draws") from err
        else:
            feats = xb
    total = 0.0
    for j, k in enumerate(folds):
        x = feats[j]
        if template.n_extra:
            x = torch.cat([x, extra[fold_batches[k][step]].to(compute.device).to(x.dtype)], dim=1)
        with rngs[k], compute.autocast():
            logits = functional_call(template.head, {n: t[j] for n, t in p_head.items()}, (x,))
        loss = objective.loss(logits, train_targets[fold_batches[k][step]].to(compute.device))
        losses[k].append(float(loss.detach()))
        total = total + loss
    total.backward()
    if b_bb is not bb["buffers"] and next(iter(b_bb.values()))._base is None:  # a copy: write its statistics back
        index = torch.as_tensor(folds, device=xb.device)
        with torch.no_grad():
            for n, t in b_bb.items():
                bb["buffers"][n].index_copy_(0, index, t)
