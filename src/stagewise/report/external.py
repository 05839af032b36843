"""The external-validation report's context, read from an evaluation folder's external.json.

As for a study's report (context.py), nothing is recomputed: every number shown is a value of
external.json passed through formatting.py, the curves are drawn by figures.py (the same
functions, with the external cohort and the development out-of-fold figures as two "units"),
and the TRIPOD+AI items are written by external_checklist.py.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from stagewise.report.external_checklist import external_checklist
from stagewise.report.figures import calibration_figure, decision_figure, palette, roc_figure, site_forest_figure
from stagewise.report.formatting import DASH, finite, fmt_ci, fmt_mean_sd, fmt_num, fmt_point_ci
from stagewise.report.participants import SITES_NOTE, baseline_rows, participants_section, subgroup_table

EXTERNAL, DEVELOPMENT = "external cohort", "development (out-of-fold)"
EVALUATED, WITHOUT = "evaluated cohort, every patient", "without the training-set patients"
NOT_CHECKED = ("This evaluation did not check whether the cohort overlaps the bundle's training set (it was made by a "
               "stagewise that did not): call it an external validation only if you know that it does not.")
BEFORE, AFTER = "held out, as exported", "held out, recalibrated"
METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "balanced_accuracy": "balanced accuracy", "f1": "F1",
                "sensitivity": "sensitivity", "specificity": "specificity", "ppv": "PPV", "npv": "NPV", "brier": "Brier score", "calibration_slope": "calibration slope",
                "calibration_intercept": "calibration-in-the-large (intercept)"}


def _pct(part, whole) -> str:
    return f"{fmt_num(100 * part / whole, 1)} %" if finite(part) and finite(whole) and whole else DASH


def _comparison_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        ext = r.get("external") or {}
        out.append({
            "metric": METRIC_NAMES.get(r["metric"], r["metric"]), "key": r["metric"],
            "cv": fmt_mean_sd(r.get("development_cv")),
            "pooled": fmt_point_ci(r.get("development_pooled")),
            "reference": fmt_num(r.get("reference")), "reference_kind": r.get("reference_kind") or "",
            "external": fmt_point_ci(ext) if finite(ext.get("low")) else fmt_num(ext.get("point")),
            "difference": fmt_num(r.get("difference")),
        })
    return out


def _calibration_row(name: str, ev: dict) -> dict:
    cal = ev.get("calibration") or {}
    return {"name": name, "slope": fmt_num(cal.get("slope"), 2), "slope_ci": fmt_ci(cal.get("slope_low"), cal.get("slope_high"), 2),
            "intercept": fmt_num(cal.get("intercept"), 2),
            "intercept_ci": fmt_ci(cal.get("intercept_low"), cal.get("intercept_high"), 2),
            "brier": fmt_num(cal.get("brier")), "mean_predicted": fmt_num(ev.get("mean_predicted")),
            "observed": fmt_num(ev.get("observed_rate"))}


def _threshold_row(name: str, ev: dict) -> dict:
    at, ci = ev.get("at_threshold") or {}, ev.get("bootstrap_ci") or {}
    cell = lambda m: fmt_point_ci(ci[m]) if m in ci else fmt_num(at.get(m))  # noqa: E731
    return {"name": name, "n": ev.get("n_patients", DASH), "positive": ev.get("n_positive", DASH),
            "threshold": fmt_num(at.get("threshold"), 4), "decisions": at.get("positive_decisions", DASH),
            **{m: cell(m) for m in ("sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "f1")}}


def overlap_context(res: dict) -> dict:
    """How the report names the evaluated cohort: "external" only when the evaluation checked
    the bundle's training set and found no image or patient of it (external.json `overlap`);
    the overlap sentence; the figures without the overlapping patients."""
    overlap = res.get("overlap") or {"checked": False, "external": None, "sentence": NOT_CHECKED}
    external, found = overlap.get("external") is True, overlap.get("external") is False
    without = res.get("without_overlap") or {}
    return {
        "overlap": overlap, "is_external": external, "found": found,
        "kind": "external validation" if external else "evaluation" + (
            " (not external: the cohort overlaps the training set)" if found else ""),
        "word": "external" if external else "evaluated",
        "label": EXTERNAL if external else (EVALUATED if found else "evaluated cohort"),
        "without": {"available": bool(without.get("available")), "reason": without.get("reason"),
                    "cohort": without.get("cohort") or {},
                    "by_metric": {r["key"]: r for r in _comparison_rows(without.get("comparison", []))}}
        if without else None,
    }


def _site_rows(ext: dict) -> list[dict]:
    rows = []
    for site, s in (ext.get("sites") or {}).items():
        at = s.get("at_threshold") or {}
        rows.append({"site": site, "n": s.get("n_patients"), "positive": s.get("n_positive"),
                     "auroc": fmt_point_ci(s.get("auroc_bootstrap_ci") or s.get("auroc_delong_ci")),
                     "sensitivity": fmt_num(at.get("sensitivity")), "specificity": fmt_num(at.get("specificity")),
                     "brier": fmt_num(s.get("brier")), "mean_predicted": fmt_num(s.get("mean_predicted")),
                     "observed": fmt_num(s.get("observed_rate"))})
    return rows


def _recalibration(rec: dict | None, colors: dict) -> dict | None:
    if not rec:
        return None
    pair = {BEFORE: rec["before"], AFTER: rec["after"]}
    return {
        "method": "intercept only (calibration-in-the-large)" if rec["method"] == "intercept" else "intercept and slope",
        "formula": f"p′ = sigmoid({fmt_num(rec['intercept'], 4)} + {fmt_num(rec['slope'], 4)} · logit p)",
        "fit": rec["fitted_on"], "held": rec["held_out"], "fraction": fmt_num(100 * rec["fit_fraction"], 0) + " %",
        "seed": rec["seed"], "threshold": fmt_num(rec["threshold"], 4),
        "rows": [_calibration_row(BEFORE, rec["before"]), _calibration_row(AFTER, rec["after"])],
        "threshold_rows": [_threshold_row(BEFORE, rec["before"]), _threshold_row(AFTER, rec["after"])],
        "figure": calibration_figure([BEFORE, AFTER], pair, colors),
    }


def _cards(word: str, cohort: dict, dev_cohort: dict, dev: dict, threshold: float) -> list[dict]:
    return [
        {"label": f"{word} patients", "value": cohort.get("patients", DASH),
         "sub": f"{cohort.get('positive_patients', DASH)} positive · {cohort.get('images', DASH)} images "
                f"({cohort.get('images_scored', DASH)} scored)"},
        {"label": f"prevalence ({word})", "value": _pct(cohort.get("positive_patients"), cohort.get("patients")),
         "sub": f"development {_pct(dev_cohort.get('positive_patients'), dev_cohort.get('patients'))}"},
        {"label": "development patients", "value": dev_cohort.get("patients", DASH),
         "sub": f"{dev_cohort.get('positive_patients', DASH)} positive · {dev.get('n_folds') or DASH} folds"},
        {"label": "threshold (stored)", "value": fmt_num(threshold, 4), "sub": "chosen on development data"},
    ]


def build_external_context(folder: str | Path) -> dict:
    """Everything the external-validation report shows, formatted."""
    folder = Path(folder)
    res = json.loads((folder / "external.json").read_text())
    b, ext, dev, cohort = res["bundle"], res["external"], res["development"], res["cohort"]
    ov = overlap_context(res)
    label, without = ov["label"], res.get("without_overlap") or {}
    rest = {WITHOUT: without["external"]} if without.get("available") else {}
    curves = {label: ext} | {n: e for n, e in rest.items() if e.get("roc")} | ({DEVELOPMENT: dev} if dev.get("roc") else {})
    colors = palette([label, DEVELOPMENT, BEFORE, AFTER, WITHOUT])
    ctx = {
        "title": f"{b['recipe']}: {b['output']}",
        "generated": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "version": res.get("stagewise", ""),
        "bundle": b, "bundle_threshold": fmt_num(b["threshold"], 4),
        "outcome": res["outcome"], "settings": res["settings"],
        "cards": _cards(ov["word"], cohort, b.get("development_cohort") or {}, dev, b["threshold"]),
        "comparison": _comparison_rows(res.get("comparison", [])),
        "calibration": [_calibration_row(n, e) for n, e in curves.items()],
        "threshold_rows": [_threshold_row(n, e) for n, e in ({label: ext} | rest).items()],
        "sites": _site_rows(ext),
        "recalibration": _recalibration(res.get("recalibration"), colors),
        "development_available": bool(dev.get("available")),
        "figures": {
            "roc": roc_figure(list(curves), curves, colors),
            "calibration": calibration_figure(list(curves), curves, colors),
            "decision": decision_figure(list(curves), curves, colors),
            "sites": site_forest_figure([label], {label: ext}, colors),
        },
        "seconds": fmt_num(res.get("seconds"), 1),
        **ov,
        "participants": participants_section(cohort),
        "subgroups": subgroup_table(ext.get("subgroups") or {}, ["external"]),
        "baselines": baseline_rows(ext.get("baselines") or {}),
        "sites_note": SITES_NOTE if ext.get("sites") and ext.get("sites_hold_patients") is False else "",
    }
    ctx["checklist_auto"], ctx["checklist_user"] = external_checklist(res)
    return ctx
