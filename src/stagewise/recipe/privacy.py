"""Differential privacy of a federated arm (`sites.privacy`): record-level DP-SGD at each
site, with its budget computed by a real accountant.

Each site clips every training image's gradient to `clip` and adds Gaussian noise of
`noise_multiplier * clip` to the sum before each step (Opacus' DP-SGD, on the groups that
train; frozen groups do not change, so they spend nothing). The privacy unit is one image (a
record): a patient with several images is protected as a group of that many records, which
is weaker. What a recipe cannot combine with per-record clipping is refused here, by name.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator
from stagewise.recipe.base import StrictModel


MEANINGLESS_EPSILON = 100.0
"""Above this epsilon a DP guarantee says nothing useful (e^100 is a likelihood ratio no one
can be protected by); such budgets are stated as 'no meaningful privacy guarantee'."""


class PrivacyConfig(StrictModel):
    """Record-level DP-SGD at each site of a federated arm, with an accounted budget."""

    mechanism: Literal["dp_sgd"] = "dp_sgd"
    """dp_sgd: per-image gradient clipping and Gaussian noise at each site (Opacus)."""
    clip: float = Field(1.0, gt=0)
    """The L2 bound each image's gradient is clipped to before summing (`.inf`: no clipping)."""
    noise_multiplier: float | None = Field(None, ge=0)
    """Noise standard deviation as a multiple of `clip` (give this or `target_epsilon`)."""
    target_epsilon: float | None = Field(None, gt=0)
    """The epsilon each site may spend over the whole fit; the accountant picks each site's noise."""
    delta: float = Field(1e-5, gt=0, lt=1)
    """The delta of the (epsilon, delta) guarantee, per site; keep it well below 1 / images per site."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus' accountant that turns noise, sampling rate and steps into epsilon (rdp: Renyi DP;
    prv: privacy random variables, tighter)."""

    @model_validator(mode="after")
    def _one_noise_source(self) -> "PrivacyConfig":
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give either privacy.noise_multiplier or privacy.target_epsilon (the accountant then "
                             "picks the noise), not both and not neither")
        if math.isinf(self.clip) and (self.target_epsilon is not None or self.noise_multiplier):
            raise ValueError("privacy.clip: .inf (no clipping) only goes with noise_multiplier: 0, a run without "
                             "privacy for comparison; noise is a multiple of a finite clip")
        return self


def privacy_problems(arm) -> list[str]:
    """What an arm with `sites.privacy` combines with DP-SGD that breaks per-image clipping or
    the accountant's assumptions, each with its fix (the arm's stages and sites as the recipe
    gives them; backbone-dependent refusals, BatchNorm that trains, are `stagewise validate`'s)."""
    cfg = arm.sites
    problems = []
    if cfg.mode != "federated":
        problems.append("sites.privacy is for a federated arm (sites.mode: federated)")
    if cfg.strategy == "fedprox":
        problems.append("sites.privacy with strategy fedprox: FedProx's proximal term is added outside the clipped "
                        "per-image gradients; use fedavg or fedadam")
    for i, stage in enumerate(arm.stages):
        if stage.external:
            continue
        where = f"stage {i} ({stage.kind})"
        if stage.cutmix is not None or stage.mixup is not None:
            problems.append(f"{where}: cutmix/mixup blend two images into one training example, so no gradient "
                            "belongs to one image; remove them under sites.privacy")
        if stage.balanced_sampling:
            problems.append(f"{where}: balanced_sampling draws images with replacement and unequal weights; DP-SGD "
                            "draws each image independently with the same rate (Poisson): remove balanced_sampling")
        if stage.bn != "freeze":
            problems.append(f"{where}: bn: {stage.bn} estimates BatchNorm statistics from the site's images "
                            "(train-mode BatchNorm mixes the images of a batch, and its statistics leave the site "
                            "unnoised): use bn: freeze")
        if stage.checkpointing or stage.activation_bits:
            problems.append(f"{where}: checkpointing and activation_bits change the backward pass that per-image "
                            "gradients are computed in; remove them under sites.privacy")
    return problems
