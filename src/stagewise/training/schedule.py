"""A stage's optimizer and learning-rate schedule.

AdamW over every group that will ever train in the stage, and the stage's schedule over its
steps. A federated round runs one part of its stage: with `sites.lr_schedule: across_rounds`
the schedule spans all of the stage's rounds, each round continuing where the last ended, as
pooled training runs it over the stage's epochs; otherwise each round runs the whole schedule
over its own local epochs (restarting every round, Flower's usual local training).
"""

from __future__ import annotations

import warnings

import torch

from stagewise.recipe import Stage
from stagewise.training.compute import Compute


def stage_optimizer(stage: Stage, lrs: dict[str, float], weight_decay: dict[str, float], groups: dict,
                    steps_per_epoch: int, compute: Compute, part: tuple[int, int] = (0, 1)):
    """AdamW over the groups of `lrs` (group -> peak LR; registered from the first step, so no
    parameter-group surgery when a group thaws), and the stage's LR schedule (None when
    constant). With `part` (i, n) the schedule spans n times this call's steps and starts where
    part i begins; (0, 1) is the schedule over this call's steps alone."""
    optimizer = torch.optim.AdamW(
        [{"params": groups[g], "lr": lr, "weight_decay": weight_decay[g], "name": g} for g, lr in lrs.items()],
        **compute.optimizer_options,
    )
    index, parts = part
    if not 0 <= index < parts:
        raise ValueError(f"schedule part {index} of {parts}: a part runs from 0 to {parts - 1}")
    steps = steps_per_epoch * stage.epochs
    scheduler = None
    if stage.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=list(lrs.values()), total_steps=steps * parts, pct_start=stage.pct_start,
            anneal_strategy="cos")
    elif stage.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps * parts)
    if scheduler is not None and index:
        with warnings.catch_warnings():  # stepping the schedule alone, to part i's start, is the point here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            for _ in range(index * steps):
                scheduler.step()
    return optimizer, scheduler
