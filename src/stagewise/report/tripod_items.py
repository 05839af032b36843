"""TRIPOD+AI checklist items about participants, subgroups and the curves' uncertainty, stated
only where metrics.json (or external.json) holds what they claim: the participant flow, the
performance per subgroup level, the smoothed calibration curve and the bootstrap bands of the
calibration and decision curves. Shared by the study's checklist and the external one; an item
the run could not state becomes a to-do for the authors instead.
"""

from __future__ import annotations

from stagewise.report.formatting import DASH


def participants_lines(cohort: dict) -> list[str]:
    """The flow in counts and what the characteristics table shows; [] for a run without them."""
    flow = cohort.get("flow")
    if not flow:
        return []
    before = "; ".join(f"{s['step']}: {s['rows']}" for s in flow.get("before_manifest") or [])
    lines = [f"before the manifest, as its prepare script counted: {before}"] if before else []
    lines += [f"{flow['rows_read']} manifest rows read; {flow['dropped_missing_outcome']} left out for an empty outcome; "
             f"{flow['images']} images of {flow['patients']} patients analysed"]
    ch = cohort.get("characteristics") or {}
    if ch.get("groups"):
        by = ["outcome"] + (["site"] if any(g["by"] == "site" for g in ch["groups"]) else [])
        cols = list(ch.get("subgroups") or {})
        lines.append(f"characteristics table by {' and by '.join(by)}: patients, images, outcome prevalence"
                     + (f", distribution of {', '.join(cols)}" if cols else ""))
    return lines


def subgroup_lines(subgroups: dict) -> list[str]:
    """Which units' AUROC is given per level of which columns, with what uncertainty; [] without."""
    units = list((subgroups or {}).get("units") or {})
    if not units:
        return []
    n_boot = subgroups.get("resamples")
    return [f"AUROC per level of {', '.join(subgroups['columns'])} for {', '.join(units)}"
            + (f", with patient-bootstrap 95 % CIs ({n_boot} resamples)" if n_boot else " (no CIs: bootstrap off)"),
            f"levels with fewer than {subgroups.get('min_class', DASH)} patients with or without the outcome: counts "
            "only, no estimate"]


SUBGROUP_HINT = ("performance across groups (sex, age, site, device, view) or why none was examined; name manifest "
                 "columns in the recipe's `cohort.subgroups` and the report breaks the AUROC down by them")


def curve_lines(ev: dict, names: list[str]) -> list[str]:
    """What the calibration and decision curves of `names` show: the smooth and the bands only
    where their evidence holds them."""
    curves = [ev.get(n, {}).get("calibration_curve") or {} for n in names]
    decisions = [ev.get(n, {}).get("decision_curve") or {} for n in names]
    smooth = [c.get("smooth") or {} for c in curves]
    lines = []
    if any(any(v is not None for v in s.get("observed") or []) for s in smooth):
        banded = any(s.get("low") for s in smooth)
        lines.append("smoothed calibration curve (LOWESS)" + (" with a 95 % patient-bootstrap band" if banded else ""))
    if any(d.get("net_benefit_model_low") for d in decisions):
        lines.append("decision curves with 95 % patient-bootstrap bands of the net benefit")
    return lines


def external_items(res: dict) -> tuple[list[dict], list[dict]]:
    """The external validation's items of this module: (stated, for the authors)."""
    ext, cohort = res.get("external") or {}, res.get("cohort") or {}
    auto, user = [], []

    def item(topic: str, lines: list[str]) -> None:
        if lines:
            auto.append({"topic": topic, "guide": "TRIPOD+AI", "lines": lines})

    item("Participants: flow and characteristics", participants_lines(cohort))
    item("Subgroups and fairness", subgroup_lines(ext.get("subgroups") or {}))
    baselines = ext.get("baselines") or {}
    item("Comparators", [
        f"routine-score baselines of the development study on the same external patients: {', '.join(baselines)}; "
        "paired DeLong test of the model against each"] if baselines else [])
    item("Uncertainty of the curves", curve_lines({"external": ext}, ["external"]))
    if not (ext.get("subgroups") or {}).get("units"):
        user.append({"topic": "Subgroups and fairness", "guide": "TRIPOD+AI", "hint": SUBGROUP_HINT.replace(
            "name manifest columns in the recipe's `cohort.subgroups` and the report breaks the AUROC down by them",
            "pass `--subgroup COLUMN` (or COLUMN:CUT,CUT for a numeric column) to `stagewise evaluate`")})
    return auto, user
