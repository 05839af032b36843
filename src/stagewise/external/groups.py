"""The external cohort broken down as a study's report breaks its cohort down: per site, per
subgroup level (`cohort.subgroups` of the bundle's recipe, or `--subgroup`), and against the
routine-score baselines of the bundle's recipe where the manifest has their columns.

An external "site" column often groups images rather than patients (a view: one patient's AP
and PA films), so every group here is a set of images: a patient's score in a group is the
aggregate of its scored images in that group (for a column fixed per patient, all of them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stagewise.data import Cohort
from stagewise.data.subgroups import level_order, varies_within_patient
from stagewise.evaluation.evidence import auroc_cis
from stagewise.evaluation.metrics import patient_scores
from stagewise.evaluation.statistics import delong_test
from stagewise.evaluation.subgroups import MIN_CLASS, level_figures
from stagewise.external.validation import at_threshold
from stagewise.recipe import SubgroupConfig


def group_tables(t: pd.DataFrame, prob: np.ndarray, used: np.ndarray, values: np.ndarray,
                 aggregate: str) -> dict[str, pd.DataFrame]:
    """Per value of `values` (one per image): its patients' scores (columns patient, y, score)
    from the scored images (`used`) of that value, aggregated per patient by `aggregate`."""
    out = {}
    for level in dict.fromkeys(values[used]):
        keep = used & (values == level)
        part = t[keep]
        score, y = patient_scores(prob[keep], part["y"].to_numpy(), part["patient"].to_numpy(), aggregate)
        out[str(level)] = pd.DataFrame({"patient": part["patient"].drop_duplicates().to_numpy(), "y": y.astype(int),
                                        "score": score})
    return out


def site_figures(t: pd.DataFrame, prob: np.ndarray, used: np.ndarray, aggregate: str, threshold: float,
                 n_boot: int, seed: int) -> dict:
    """Per site: counts, AUROC with DeLong and bootstrap CIs, the decisions at the threshold,
    the Brier score and mean predicted against observed, on the site's scored images."""
    out = {}
    for site, part in group_tables(t, prob, used, t["site"].astype(str).to_numpy(), aggregate).items():
        y, s = part["y"].to_numpy(), part["score"].to_numpy()
        out[site] = auroc_cis(y, s, part["patient"].to_numpy(), n_boot, seed) | {
            "at_threshold": at_threshold(y, s, threshold),
            "brier": float(np.mean((s - y) ** 2)), "mean_predicted": float(s.mean()), "observed_rate": float(y.mean())}
    return out


def sites_hold_patients(t: pd.DataFrame) -> bool:
    """Whether every patient's images lie at one site (a study's meaning of a site)."""
    return "site" not in t or not varies_within_patient(t, "site")


def subgroup_figures(cohort: Cohort, prob: np.ndarray, used: np.ndarray, aggregate: str, specs: list[SubgroupConfig],
                     n_boot: int, seed: int) -> dict:
    """Per subgroup column and level: `level_figures` (AUROC with a patient-bootstrap CI when
    the level has MIN_CLASS patients of each class, else counts), as a study's report has them."""
    t, groups = cohort.table, cohort.groups
    columns, figures = {}, {}
    for spec in specs:
        if spec.column not in groups:
            continue
        values = groups[spec.column].to_numpy(dtype=object)
        tables = group_tables(t, prob, used, values, aggregate)
        levels = level_order(spec, tables)
        columns[spec.column] = {"levels": levels, "per_image": bool(varies_within_patient(
            t.assign(_level=values), "_level")), "bands": spec.bands}
        figures[spec.column] = {lv: level_figures(tables[lv]["y"], tables[lv]["score"], int((used & (values == lv)).sum()),
                                                  n_boot, seed) for lv in levels}
    if not columns:
        return {}
    return {"min_class": MIN_CLASS, "resamples": n_boot, "columns": columns, "units": {"external": figures}}


def baseline_figures(cohort: Cohort, table: pd.DataFrame, used: np.ndarray, aggregate: str, columns: list[str],
                     development: dict, n_boot: int, seed: int) -> dict:
    """Per baseline column the manifest has: its AUROC on the external patients with a value
    (DeLong and bootstrap CIs), oriented as in development (the bundle's oof.json `baselines`:
    direction +1 or -1 and the cross-validated figures, shown beside; +1, higher means the
    outcome, where the bundle does not say), and the paired DeLong test of the model against it
    on those patients (`table`: the model's patient scores)."""
    t, out = cohort.table, {}
    directions = {c: d["direction"] for c, d in development.items() if d.get("direction") in (1, -1)}
    for col in columns:
        direction = int(directions.get(col, 1))
        keep = used & t[col].notna().to_numpy()
        if not keep.any():
            out[col] = {"n_patients": 0, "n_positive": 0, "direction": direction}
            continue
        part = t[keep]
        score, y = patient_scores(direction * part[col].to_numpy(dtype=float), part["y"].to_numpy(),
                                  part["patient"].to_numpy(), aggregate)
        patients = part["patient"].drop_duplicates().to_numpy()
        rec = auroc_cis(y.astype(int), score, patients, n_boot, seed) | {
            "direction": direction, "direction_from": "development" if col in directions else "assumed (higher = outcome)"}
        model = table.set_index("patient").loc[patients, "score"].to_numpy()
        if len(np.unique(y)) == 2:
            rec["model_vs_baseline"] = delong_test(y.astype(int), model, score)
        if development.get(col):
            rec["development"] = development[col]
        out[col] = rec
    return out


def breakdowns(cohort: Cohort, prob: np.ndarray, used: np.ndarray, table: pd.DataFrame, aggregate: str,
               threshold: float, development: dict, n_boot: int, seed: int) -> dict:
    """What external.json's `external` gains beside the overall figures: `sites` (with
    `sites_hold_patients`), `subgroups` and `baselines` (`development`: the bundle's baselines,
    see `baseline_figures`), each where the manifest has the columns."""
    t, out = cohort.table, {}
    if "site" in t:
        out["sites"] = site_figures(t, prob, used, aggregate, threshold, n_boot, seed)
        out["sites_hold_patients"] = sites_hold_patients(t)
    subgroups = subgroup_figures(cohort, prob, used, aggregate, cohort.config.subgroups, n_boot, seed)
    if subgroups:
        out["subgroups"] = subgroups
    if cohort.config.baselines:
        out["baselines"] = baseline_figures(cohort, table, used, aggregate, cohort.config.baselines, development,
                                            n_boot, seed)
    return out
