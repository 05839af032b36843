"""Where a study's images come from: the cohort manifest (CohortConfig), how its images are
read (DataConfig), and the source manifest of a `pretrain` or `ssl` stage (SourceConfig)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from stagewise.recipe.base import StrictModel


class CohortConfig(StrictModel):
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


class DataConfig(StrictModel):
    image_size: int = Field(224, ge=8, le=2048)
    resize: Literal["pad", "crop", "stretch"] = "pad"
    """pad: keep aspect ratio, pad to a square; crop: centre-crop to a square; stretch."""



class SourceConfig(StrictModel):
    """Images (and labels) for a `pretrain` or `ssl` stage other than the study's cohort."""

    manifest: Path
    image: str = "path"
    targets: list[str] = []
    """pretrain: label column(s); one column for classification/regression, several for multilabel."""
    task: Literal["classification", "multilabel", "regression"] = "classification"
    root: Path | None = None
    """Folder that relative image paths start from (default: the manifest's folder)."""
