"""What `stagewise evaluate` lets a user change, and the check of all of it at once.

Another hospital's spreadsheet rarely uses the development cohort's column names or outcome
coding ("icu_ever: Y/N" where the study said "went_icu: 1/0"), so every column and the
positive and negative values can be named; what is not named is taken from the bundle's own
recipe. Every wrong option is reported together, before any image is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from stagewise.errors import StagewiseError
from stagewise.recipe import SubgroupConfig

RECALIBRATION = ("intercept", "slope")
"""intercept: refit calibration-in-the-large only; slope: refit intercept and slope."""


class EvaluateError(StagewiseError, ValueError):
    """An external validation that cannot run as asked; the message lists every problem."""

    def __init__(self, problems: list[str], source: str = "stagewise evaluate"):
        self.problems, self.source = list(problems), source
        n = len(self.problems)
        lines = [f"{source}: {n} problem{'s' if n > 1 else ''}:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return (type(self), (self.problems, self.source))


def parse_subgroup(text: str) -> SubgroupConfig:
    """'view' or 'age:40,65' (cut points) as a subgroup entry; ValueError when it is neither."""
    column, _, cuts = text.partition(":")
    if not column.strip():
        raise ValueError("no column")
    return SubgroupConfig(column=column.strip(), bands=[float(c) for c in cuts.split(",")] if cuts.strip() else None)


@dataclass
class ExternalOptions:
    """How to read the external manifest and what to compute. None means "as the bundle's
    recipe has it" (columns, outcome values, test images, patient aggregate)."""

    image: str | None = None
    outcome: str | None = None
    patient: str | None = None
    site: str | None = None
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    root: Path | None = None
    drop_missing_outcome: bool = False
    output: str | None = None
    """The bundle output to validate (default: its only, or first, output)."""
    test_images: str | None = None
    """first or all (default: the bundle's protocol, so both sides are scored alike)."""
    aggregate: str | None = None
    """mean, max or first: image scores -> patient score (default: the bundle's protocol)."""
    recalibrate: str | None = None
    """None, intercept or slope (see RECALIBRATION)."""
    fit_fraction: float = 0.5
    """Share of the external patients (whole patients, stratified) the recalibration is fitted on."""
    seed: int = 0
    bootstrap: int = 2000
    subgroups: list[str] = field(default_factory=list)
    """Columns to break the figures down by (`--subgroup`), each COLUMN or COLUMN:CUT,CUT,... (a
    numeric column cut into bands, e.g. age:40,65); empty: the bundle recipe's `cohort.subgroups`
    whose columns the manifest has."""

    def subgroup_configs(self) -> list[SubgroupConfig]:
        """`subgroups` as recipe subgroup entries (`problems` names any that cannot be read)."""
        return [parse_subgroup(text) for text in self.subgroups]

    def problems(self, outputs: list[str]) -> list[str]:
        """Every option that cannot work with a bundle having `outputs`."""
        out = []
        if self.output is not None and self.output not in outputs:
            out.append(f"--output {self.output!r}: the bundle's outputs are {', '.join(outputs)}")
        if self.test_images not in (None, "first", "all"):
            out.append(f"--images {self.test_images!r}: choose first or all")
        if self.aggregate not in (None, "mean", "max", "first"):
            out.append(f"--aggregate {self.aggregate!r}: choose mean, max or first")
        if self.recalibrate not in (None, *RECALIBRATION):
            out.append(f"--recalibrate {self.recalibrate!r}: choose intercept (calibration-in-the-large) or slope "
                       "(intercept and slope)")
        if not 0 < self.fit_fraction < 1:
            out.append(f"--fit-fraction {self.fit_fraction}: give the share of patients to fit the recalibration on, "
                       "between 0 and 1 (the rest are held out to evaluate it)")
        if self.bootstrap < 0:
            out.append(f"--bootstrap {self.bootstrap}: give a number of resamples >= 0 (0 turns the CIs off)")
        for text in self.subgroups:
            try:
                parse_subgroup(text)
            except ValueError:
                out.append(f"--subgroup {text!r}: give COLUMN, or COLUMN:CUT,CUT,... with ascending numbers "
                           "(e.g. age:40,65)")
        overlap = {v.strip().lower() for v in self.positive} & {v.strip().lower() for v in self.negative}
        if overlap:
            out.append(f"outcome value(s) {sorted(overlap)} given as both --positive and --negative; keep each in one")
        return out
