"""Where a study's images come from: the cohort manifest (CohortConfig), how its images are
read (DataConfig), and the source manifest of a `pretrain` or `ssl` stage (SourceConfig)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from stagewise.recipe.base import StrictModel

WORDING_FIELDS = ("outcome_label", "outcome_horizon")
"""Cohort fields that only word the outcome for people (bundle, model card, bedside page,
report): they change no number, so they enter no fingerprint and resume every run."""
REPORT_ONLY_FIELDS = (*WORDING_FIELDS, "subgroups")
"""Cohort fields that change what the report shows but no fold's numbers (the wording, the
subgroups the finished out-of-fold scores are broken down by): no fingerprint holds them, so
adding or changing one resumes every finished fold."""


def outcome_phrase(column: str, label: str | None = None, horizon: str | None = None,
                   name_column: bool = False) -> str:
    """The outcome as a person reads it: its label (else the column name) and its time frame,
    e.g. 'admission to intensive care within 30 days of the radiograph'; with `name_column`,
    a labelled outcome names its column too ('... (column went_icu)')."""
    text = " ".join(part for part in (label or column, horizon) if part)
    return f"{text} (column {column})" if name_column and label else text


def task_outcome(task: dict, name_column: bool = False) -> str:
    """`outcome_phrase` of a bundle output (bundle.json's `tasks`; a bundle made before the
    wording fields existed gives its column name)."""
    return outcome_phrase(task["outcome"], task.get("outcome_label"), task.get("outcome_horizon"), name_column)


class SubgroupConfig(StrictModel):
    """One manifest column the report breaks performance down by (see `CohortConfig.subgroups`)."""

    column: str
    """The manifest column."""
    bands: list[float] | None = None
    """Cut points of a numeric column, ascending: [40, 65] gives the bands "< 40", "40 to < 65"
    and ">= 65". Unset: every distinct value of the column is a level of its own."""

    @field_validator("bands")
    @classmethod
    def _ascending(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(b <= a for a, b in zip(value, value[1:]))):
            raise ValueError("give one or more cut points in ascending order, e.g. [40, 65]")
        return value


class CohortConfig(StrictModel):
    """Where the images and labels are: a CSV manifest, one row per image."""

    manifest: Path
    """The CSV file, one row per image (relative to the recipe file)."""
    image: str = "path"
    """Column holding image paths, relative to `root` (default: the manifest's folder)."""
    outcome: str = "outcome"
    """The primary binary outcome: folds are stratified on it, comparisons use it."""
    outcome_label: str | None = None
    """The primary outcome in clinical words (e.g. "admission to intensive care"), shown in
    the bundle, its model card, the bedside page and the report; unset: the column name.
    Wording only: it changes no number and no fingerprint."""
    outcome_horizon: str | None = None
    """When the outcome counts (e.g. "within 30 days of the radiograph"), shown after the
    label; unset: no time frame is stated. Wording only, like `outcome_label`."""
    extra_outcomes: list[str] = []
    """Further binary outcomes learned by the same network (multi-task); empty cells are
    missing labels, masked out of the loss and the metrics."""
    patient: str = "patient"
    """Column of patient ids: folds never split a patient's images."""
    site: str | None = None
    """Column of the hospital each image comes from (needed by local and federated arms and by leave_one_site_out)."""
    clinical: list[str] = []
    """Numeric clinical columns for the clinical-only model and fusion heads (`head.fusion`)."""
    baselines: list[str] = []
    """Columns holding routine clinical scores (e.g. an IRDS grade), carried for baselines."""
    subgroups: list[SubgroupConfig] = []
    """Columns whose levels the report and `stagewise evaluate` break performance down by
    (TRIPOD+AI: fairness, subgroups), e.g. `[sex, view, {column: age, bands: [40, 65]}]`: a
    plain name makes each distinct value a level (at most 12; an empty cell is "not recorded"),
    `{column, bands}` cuts a numeric column at the given points. A column may vary between one
    patient's images (a view): each level then uses the patients' images of that level.
    Report only: the folds' numbers do not change, so no fingerprint holds it."""
    root: Path | None = None
    """Folder that relative image paths start from (default: the manifest's folder)."""
    positive: list[str] = ["1", "1.0", "true", "yes", "y", "positive"]
    """Outcome values read as the positive class (compared case-insensitively)."""
    negative: list[str] = ["0", "0.0", "false", "no", "n", "negative"]
    """Outcome values read as the negative class (compared case-insensitively)."""
    drop_missing_outcome: bool = False
    """Drop rows whose outcome is empty instead of reporting them as errors."""

    @field_validator("subgroups", mode="before")
    @classmethod
    def _plain_names(cls, value):
        """A plain column name is a subgroup without bands."""
        return [{"column": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("subgroups")
    @classmethod
    def _once(cls, value: list[SubgroupConfig]) -> list[SubgroupConfig]:
        twice = sorted({s.column for s in value if [t.column for t in value].count(s.column) > 1})
        if twice:
            raise ValueError(f"column(s) {', '.join(twice)} listed more than once")
        return value

    @field_validator(*WORDING_FIELDS)
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be empty (leave the field out instead)")
        if any(c in value for c in "\n\r\v\f\x85\u2028\u2029"):
            raise ValueError("must be one line (no line breaks)")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must not hold control characters")
        return value.strip()

    def wording(self, outcome: str) -> dict:
        """`outcome_label` and `outcome_horizon` of output `outcome` (the primary outcome's;
        None for an extra outcome), as bundle.json's tasks carry them."""
        primary = outcome == self.outcome
        return {"outcome_label": self.outcome_label if primary else None,
                "outcome_horizon": self.outcome_horizon if primary else None}


class DataConfig(StrictModel):
    image_size: int = Field(224, ge=8, le=2048)
    """Side in pixels of the square each image is brought to (see `resize`)."""
    resize: Literal["pad", "crop", "stretch"] = "pad"
    """pad: keep aspect ratio, pad to a square; crop: centre-crop to a square; stretch."""



class SourceConfig(StrictModel):
    """Images (and labels) for a `pretrain` or `ssl` stage other than the study's cohort."""

    manifest: Path
    """The source CSV, one row per image (relative to the recipe file)."""
    image: str = "path"
    """Column holding image paths, relative to `root`."""
    targets: list[str] = []
    """pretrain: label column(s); one column for classification/regression, several for multilabel."""
    task: Literal["classification", "multilabel", "regression"] = "classification"
    """The source task: one class column, several 0/1 columns, or one numeric column."""
    root: Path | None = None
    """Folder that relative image paths start from (default: the manifest's folder)."""
