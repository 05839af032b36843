"""The report's TRIPOD+AI participant and subgroup sections as template rows: the participant
flow (manifest rows read, left out and why, analysed), the characteristics table by outcome and
by site, and the AUROC per subgroup level. Shared by the study report and the external one; like
`sections`, nothing here reads a file or recomputes a number: values of metrics.json (or
external.json) are only formatted.
"""

from __future__ import annotations

from stagewise.report.formatting import DASH, fmt_ci, fmt_num, fmt_p, fmt_point_ci

TOO_FEW = "too few to estimate"
FLOW_NOTE = ("A row with any other problem (an image missing or unreadable, an outcome value neither positive nor "
             "negative, a patient with two outcomes) stops the run instead of being left out, so no other row was "
             "dropped; blank lines are not rows.")


def _pct(part, whole) -> str:
    return f"{fmt_num(100 * part / whole, 0)} %" if whole else DASH


def flow_rows(cohort: dict, ev: dict | None = None, order: list[str] | None = None) -> list[dict]:
    """The participant flow in counts: rows read, rows left out for an empty outcome, images and
    patients analysed; and, per unit of `order` whose evidence covers fewer patients (a
    baseline without a value, untested surplus negatives), how many of them it scored."""
    flow = cohort.get("flow")
    if not flow:
        return []
    before = flow.get("before_manifest") or []
    rows = [{"step": "before the manifest, as its prepare script counted:", "count": "", "indent": False}] if before else []
    rows += [{"step": s["step"], "count": s["rows"], "indent": True} for s in before]
    rows += [{"step": "manifest rows read", "count": flow["rows_read"], "indent": False},
            {"step": "left out: empty outcome", "count": flow["dropped_missing_outcome"],
             "indent": True},
            {"step": "images analysed", "count": flow["images"], "indent": False},
            {"step": "patients analysed", "count": flow["patients"], "indent": False}]
    scored = cohort.get("images_scored")  # an external validation scoring each patient's first image only
    if scored is not None and scored != flow["images"]:
        rows.insert(len(rows) - 1, {"step": "images scored (each patient's first)", "count": scored, "indent": True})
    for name in order or []:
        n = (ev or {}).get(name, {}).get("n_patients")
        if n is not None and n < flow["patients"]:
            rows.append({"step": f"{name}: patients with an out-of-fold score", "count": n, "indent": True})
    return rows


def participants_section(cohort: dict, ev: dict | None = None, order: list[str] | None = None) -> dict:
    """The Participants section: the flow (`flow_rows`), its note and the characteristics table."""
    return {"flow": flow_rows(cohort, ev, order), "flow_note": FLOW_NOTE, "characteristics": characteristics_table(cohort)}


def with_tripod_nav(nav: list[tuple[str, str]], ctx: dict) -> list[tuple[str, str]]:
    """The page's table of contents with Participants (after the first entry of the results) and
    Subgroups (before the checklist) where the page shows them."""
    out = list(nav)
    part = ctx.get("participants") or {}
    if part.get("flow") or part.get("characteristics"):
        at = next((i for i, (k, _) in enumerate(out) if k not in ("conclusions",)), 0)
        out.insert(at, ("participants", "Participants"))
    if ctx.get("subgroups"):
        at = next((i for i, (k, _) in enumerate(out) if k in ("tuning", "training-curves", "saliency", "checklist")),
                  len(out))
        out.insert(at, ("subgroups", "Subgroups"))
    return out


def _level_cell(counts: dict | None, total: int, per_image: bool) -> str:
    if not counts:
        return "0"
    text = f"{counts['patients']} ({_pct(counts['patients'], total)})"
    return text + f" · {counts['images']} img" if per_image else text


def characteristics_table(cohort: dict) -> dict | None:
    """'Table 1': one column per group (everyone, each outcome, each site), rows for patients,
    images, prevalence and each subgroup level (patients with it and their share; for a column
    that varies within a patient, its images too). None for a run made before it existed."""
    ch = cohort.get("characteristics")
    if not ch:
        return None
    groups = ch["groups"]
    heads = [{"by": g["by"], "label": "everyone" if g["by"] == "all" else
              (f"outcome {g['level']}" if g["by"] == "outcome" else f"site {g['level']}")} for g in groups]
    rows = [{"label": "patients", "cells": [g["patients"] for g in groups], "kind": "count"},
            {"label": "images", "cells": [g["images"] for g in groups], "kind": "count"},
            {"label": "patients with the outcome", "kind": "count",
             "cells": [f"{g['positive_patients']} ({_pct(g['positive_patients'], g['patients'])})" for g in groups]}]
    for column, sub in ch.get("subgroups", {}).items():
        note = " (patients with such an image; one can count in several)" if sub.get("per_image") else ""
        rows.append({"label": f"{column}{note}", "cells": [], "kind": "column"})
        for level in sub["levels"]:
            rows.append({"label": level, "kind": "level",
                         "cells": [_level_cell(g["levels"].get(column, {}).get(level), g["patients"], sub.get("per_image"))
                                   for g in groups]})
    return {"heads": heads, "rows": rows}


def subgroup_table(subgroups: dict, order: list[str]) -> dict | None:
    """AUROC per subgroup level (rows) and unit (columns), with the level's patients, events and
    images (those of the first unit; a unit scoring other patients says how many); a level with
    too few events says so instead of a figure. None when the run has no subgroups."""
    per_unit = (subgroups or {}).get("units") or {}
    units = [n for n in order if n in per_unit]
    if not units:
        return None
    rows = []
    for column, sub in subgroups["columns"].items():
        for level in sub["levels"]:
            figs = [per_unit[u].get(column, {}).get(level) or {} for u in units]
            first = figs[0]
            cells = []
            for f in figs:
                text = fmt_point_ci(f.get("auroc")) if f.get("estimable") else TOO_FEW
                if f.get("n_patients") != first.get("n_patients") or f.get("n_positive") != first.get("n_positive"):
                    text += f" (n {f.get('n_patients', DASH)}, {f.get('n_positive', DASH)} events)"
                cells.append({"text": text, "estimable": bool(f.get("estimable"))})
            rows.append({"column": column, "level": level, "patients": first.get("n_patients", DASH),
                         "events": first.get("n_positive", DASH), "images": first.get("n_images", DASH), "cells": cells})
    per_image = [c for c, sub in subgroups["columns"].items() if sub.get("per_image")]
    ci = (f"a 95 % CI from {subgroups['resamples']} bootstrap resamples of its patients" if subgroups.get("resamples")
          else "no CI (bootstrap off)")
    note = (f"Each level's AUROC uses the out-of-fold scores of its patients, with {ci}; a level with fewer than "
            f"{subgroups.get('min_class')} patients with or without the outcome shows its counts only ({TOO_FEW}).")
    if per_image:
        note += (f" {', '.join(per_image)} can differ between one patient's images: a level then scores each patient on "
                 "its images of that level, and a patient can count in several levels.")
    return {"units": units, "rows": rows, "note": note}


SITES_NOTE = ("Some patients have images under several values of the site column (e.g. views): each value's figures "
              "score a patient on its images of that value, so a patient can count under several.")


def baseline_rows(baselines: dict) -> list[dict]:
    """External validation: per routine-score baseline, its AUROC on the external patients with
    a value, its development AUROC, and the paired DeLong test of the model against it."""
    rows = []
    for name, b in (baselines or {}).items():
        test = b.get("model_vs_baseline") or {}
        dev = (b.get("development") or {}).get("auroc_delong_ci")
        rows.append({"name": name, "n": b.get("n_patients", DASH), "positive": b.get("n_positive", DASH),
                     "auroc": fmt_point_ci(b.get("auroc_bootstrap_ci") or b.get("auroc_delong_ci")),
                     "development": fmt_point_ci(dev) if dev else DASH,
                     "diff": (f"{fmt_num(test.get('diff'))} {fmt_ci(test.get('ci_low'), test.get('ci_high'))}"
                              if test else DASH),
                     "p": fmt_p(test.get("p")) if test else DASH,
                     "orientation": ("higher = outcome" if b.get("direction", 1) == 1 else "lower = outcome")
                     + ("" if b.get("direction_from") == "development" else " (assumed: the bundle does not say)")})
    return rows
