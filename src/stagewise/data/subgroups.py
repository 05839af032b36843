"""The subgroup levels of a cohort's rows (recipe `cohort.subgroups`): each named manifest column
as one text level per image, numeric columns cut into bands.

Performance by sex, age band, view or site is what TRIPOD+AI asks of a model that may serve some
patients worse than others; the levels are computed once here, when the manifest is read, so
that the study's evidence, its report and `stagewise evaluate` break results down alike.
"""

from __future__ import annotations

import math

import pandas as pd

from stagewise.recipe import CohortConfig, SubgroupConfig

MAX_LEVELS = 12
"""A plain column with more distinct values than this is refused: a numeric column needs bands,
and a table of many tiny levels estimates nothing."""
NOT_RECORDED = "not recorded"
"""The level of an empty cell."""


def _num(x: float) -> str:
    return f"{x:g}"


def band_labels(bands: list[float]) -> list[str]:
    """The levels of cut points, in order: [40, 65] -> '< 40', '40 to < 65', '≥ 65'."""
    inner = [f"{_num(a)} to < {_num(b)}" for a, b in zip(bands, bands[1:])]
    return [f"< {_num(bands[0])}", *inner, f"≥ {_num(bands[-1])}"]


def band_of(value: float, bands: list[float]) -> str:
    """The band label of one value (`band_labels`); a value equal to a cut point is in the band above."""
    labels = band_labels(bands)
    return labels[sum(value >= b for b in bands)]


def level_order(spec: SubgroupConfig, levels) -> list[str]:
    """The levels present, in reading order: bands low to high, else sorted; 'not recorded' last."""
    present = set(levels)
    order = band_labels(spec.bands) if spec.bands else sorted(present - {NOT_RECORDED})
    return [x for x in order if x in present] + ([NOT_RECORDED] if NOT_RECORDED in present else [])


def subgroup_problems(cfg: CohortConfig) -> list[str]:
    """Subgroup columns whose levels would name patients or files."""
    own = {cfg.patient: "cohort.patient", cfg.image: "cohort.image"}
    return [f"column {s.column!r} (cohort.subgroups) is the {own[s.column]} column: its levels would name "
            f"{'patients' if own[s.column] == 'cohort.patient' else 'image files'}; leave it out of the subgroups"
            for s in cfg.subgroups if s.column in own]


def read_levels(df: pd.DataFrame, spec: SubgroupConfig, where) -> tuple[list[str], list[str]]:
    """(one level per row of `df`, problems): each cell stripped ('not recorded' when empty),
    or its band; `where(line)` names a row in a message."""
    levels, problems = [], []
    for line, value in df[spec.column].items():
        v = str(value).strip()
        if not v:
            levels.append(NOT_RECORDED)
        elif spec.bands is None:
            levels.append(v)
        else:
            try:
                x = float(v)
                if math.isnan(x):
                    raise ValueError(v)
            except ValueError:
                problems.append(f"{where(line)}: column {spec.column!r} (cohort.subgroups, cut into bands): {v!r} is "
                                "not a number; leave the cell empty for a missing value")
                levels.append(NOT_RECORDED)
                continue
            levels.append(band_of(x, spec.bands))
    distinct = set(levels) - {NOT_RECORDED}
    if spec.bands is None and len(distinct) > MAX_LEVELS:
        problems.append(f"column {spec.column!r} (cohort.subgroups) has {len(distinct)} distinct values, more than "
                        f"{MAX_LEVELS} levels; cut a numeric column into bands, e.g. "
                        f"`{{column: {spec.column}, bands: [40, 65]}}`, or leave it out")
    return levels, problems


def varies_within_patient(table: pd.DataFrame, column: str) -> bool:
    """Whether some patient has images at two levels of `column` (a view, an age at imaging)."""
    return bool((table.groupby("patient", sort=False)[column].nunique() > 1).any())
