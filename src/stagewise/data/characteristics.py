"""The characteristics of a cohort ("Table 1" of TRIPOD+AI): patients, images and outcome
prevalence, and each subgroup column's distribution, over everyone, by outcome and by site.

Counts only: a level is counted in patients (those with at least one image at that level) and
in images, so a column that varies between one patient's images (a view) is described truly;
such a column is marked `per_image`, and its patients can then count under several levels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from stagewise.data.subgroups import level_order, varies_within_patient
from stagewise.recipe import SubgroupConfig


def _describe(part: pd.DataFrame, columns: list[str]) -> dict:
    labels = part.groupby("patient", sort=False)["y"].first()
    out = {"patients": int(len(labels)), "images": int(len(part)), "positive_patients": int(labels.sum()),
           "prevalence_patients": float(labels.mean()) if len(labels) else float("nan")}
    out["levels"] = {c: {str(level): {"patients": int(rows["patient"].nunique()), "images": int(len(rows))}
                         for level, rows in part.groupby(c, sort=False)} for c in columns}
    return out


def characteristics(table: pd.DataFrame, groups: pd.DataFrame, subgroups: list[SubgroupConfig]) -> dict:
    """`groups`: one column per subgroup (text levels), row for row with `table` (columns
    patient, y, [site]). Returns `subgroups` (per column: its levels in order, `per_image`) and
    `groups`, one entry per column of the table: everyone, each outcome, each site."""
    specs = [s for s in subgroups if s.column in groups]
    t = table[["patient", "y", *(["site"] if "site" in table else [])]].reset_index(drop=True)
    for s in specs:
        t[s.column] = groups[s.column].to_numpy()
    columns = [s.column for s in specs]
    parts = [("all", "all", t), ("outcome", "positive", t[t["y"] == 1]), ("outcome", "negative", t[t["y"] == 0])]
    if "site" in t:
        parts += [("site", str(site), part) for site, part in t.groupby("site", sort=False)]
    return {
        "subgroups": {s.column: {"levels": level_order(s, t[s.column]), "per_image": varies_within_patient(t, s.column),
                                 "bands": s.bands} for s in specs},
        "groups": [{"by": by, "level": level, **_describe(part, columns)} for by, level, part in parts],
    }


PREPARE_SUFFIX = ".prepare.json"
"""Beside a manifest, what the script that wrote it left out before it (e.g. examples/
prepare_covid_outcome.py writes covid-outcome.prepare.json): {"steps": [{"step": "...", "rows": n}]}."""


def prepare_steps(manifest: Path) -> list[dict] | None:
    """The counts of rows a prepare step left out before `manifest` (PREPARE_SUFFIX file beside
    it), as [{"step", "rows"}]: counts and words only; None without a readable file."""
    try:
        data = json.loads(Path(manifest).with_suffix(PREPARE_SUFFIX).read_text(encoding="utf-8"))
        steps = [{"step": str(s["step"]), "rows": int(s["rows"])} for s in data["steps"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return steps or None
