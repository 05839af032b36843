"""The stage-kind registry: everything one stage kind is, as one object registered once.

A recipe's stage is a pydantic class of `stagewise.recipe` (its fields, validation and the
plan questions the engine asks: `members`, `start_epochs`, `external`). Everything else a
kind is lives in one module of `training/stages/` that registers a `StageKind`: how it trains
on a fold's rows, how it trains on a source manifest before cross-validation, what it adds to
the training loop (hooks), what one federated round of it runs, and what it refuses for a
given backbone. Adding a kind = a recipe class + one module here; the conformance suite
(tests/conformance/test_stage_kinds.py) then runs over every registered kind, as timm's
tests run over `list_models()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from stagewise.recipe import Stage
from stagewise.training.cache import ImageSet


@dataclass(frozen=True)
class FoldData:
    """What a stage trains on in one fold: the cohort's images, the fold's training rows and
    their targets, optional standardised clinical columns (fusion heads) and the rows a
    label-free stage may use (default `rows`; at a label fraction, every training image)."""

    images: ImageSet
    rows: np.ndarray
    targets: torch.Tensor
    extra: torch.Tensor | None = None
    unlabeled: np.ndarray | None = None


@dataclass(frozen=True)
class StageKind:
    name: str
    """The recipe's `kind`."""
    schema: type[Stage]
    """The recipe class: fields, validation, `federated` (may run as Flower rounds)."""
    summary: str
    """One line for the reference and `stagewise validate`."""
    fit_fold: Callable | None = None
    """(net, stage, FoldData, compute, cache, seed, on_epoch) -> StageLog, on a fold's rows;
    None for a kind that only runs on a source manifest."""
    fit_source: Callable | None = None
    """(backbone, stage, images, source, compute, seed, on_epoch) -> StageLog, once per arm
    before cross-validation; None for a kind that only runs on the cohort."""
    hooks: type | None = None
    """A `training.hooks.StageHooks` subclass: what the kind adds to the training loop."""
    round_stage: Callable[[Stage, list[str]], Stage] | None = None
    """What one federated round runs, given the groups that train in it (default: the stage
    itself for `epochs` local epochs)."""
    backbone_problems: Callable | None = None
    """(stage, backbone, backbone name) -> problems, for `stagewise validate`."""
    example: dict | None = None
    """A minimal stage of this kind as a recipe writes it (the reference's example and the
    conformance suite's; a `source.manifest` there is a placeholder)."""

    @property
    def federated(self) -> bool:
        """Whether an arm of `sites.mode: federated` may use it (the recipe refuses it otherwise)."""
        return bool(self.schema.federated)

    @property
    def runs_on(self) -> tuple[str, ...]:
        """Where it can run: `fold` (each fold's training rows), `source` (a source manifest,
        before cross-validation)."""
        return tuple(w for w, f in (("fold", self.fit_fold), ("source", self.fit_source)) if f is not None)


_KINDS: dict[str, StageKind] = {}


def register_stage_kind(kind: StageKind) -> StageKind:
    """Register once at import; a second kind of the same name or a name the recipe does not
    know is a programming error."""
    if kind.name in _KINDS:
        raise ValueError(f"stage kind {kind.name!r} is registered twice")
    if kind.schema.model_fields["kind"].default != kind.name:
        raise ValueError(f"stage kind {kind.name!r}: its recipe class says kind {kind.schema.model_fields['kind'].default!r}")
    _KINDS[kind.name] = kind
    return kind


def stage_kind(stage: Stage | str) -> StageKind:
    """The registered kind of a recipe stage (or of a kind name)."""
    name = stage if isinstance(stage, str) else stage.kind
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"stage kind {name!r} is not registered (known: {', '.join(sorted(_KINDS))})") from None


def list_stage_kinds() -> list[str]:
    """Every registered kind, in registration order."""
    return list(_KINDS)
