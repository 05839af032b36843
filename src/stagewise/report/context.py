"""What the report shows, read from the run directory and put into the template's context.

`build_context(run_dir)` reads what the run wrote (metrics.json, recipe.yaml, environment.json,
log.txt and the saliency PNGs under folds/) and turns it into the formatted strings, table rows and
embedded figures that templates/report.html.j2 lays out. Nothing is recomputed: every number is a
value of metrics.json formatted by formatting.py (the only derived numbers are the cohort
prevalences, a ratio of two counts in metrics.json); the curves are drawn by figures.py and the
TRIPOD+AI / CLAIM items are written by checklist.py. Keeping all reading and formatting here leaves
the template with layout only, and lets the context be checked without rendering any HTML.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from stagewise.report.checklist import checklist
from stagewise.report.figures import (
    calibration_figure,
    decision_figure,
    label_efficiency_figure,
    site_forest_figure,
    palette,
    png_data_uri,
    roc_figure,
    saliency_colorbar,
    training_curve_figure,
)
from stagewise.report.formatting import (
    DASH,
    finite,
    fmt_ci,
    fmt_fraction,
    fmt_mean_sd,
    fmt_num,
    fmt_point_ci,
    fmt_setting,
)
from stagewise.recipe import shareable_recipe
from stagewise.report.interpretation import (
    comparison_rows,
    corrected_calibration_rows,
    primary_text,
    sampling_notes,
    unit_flag_notes,
)
from stagewise.report.units import is_full_label, ordered_units, recipe_arms

# ---------------------------------------------------------------------------------------------
# Reading the run


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _compute_rows(choices: dict) -> list[dict]:
    """One row per arm whose precision/layout was measured (`compute: auto`): the seconds per
    training step of each candidate and the one chosen."""
    rows = []
    for arm, c in choices.items():
        seconds = c.get("seconds_per_step") or {}
        if not seconds:
            continue
        load = c.get("load_average")
        rows.append({
            "arm": arm,
            "chosen": c.get("chosen", DASH),
            "timings": " · ".join(f"{label} {fmt_num(v * 1000, 0)} ms" for label, v in seconds.items()),
            "how": (f"measured {c.get('measured_at', '')}" + (f", load {load[0]:.1f}" if load else "")
                    + ("; read from this machine's cache" if c.get("cached") else "")),
        })
    return rows


def _run_date(run_dir: Path) -> str:
    """When the run started: the first timestamp of log.txt, else metrics.json's mtime."""
    try:
        with open(run_dir / "log.txt") as f:
            m = re.match(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2})", f.readline())
        if m:
            return m.group(1)
    except OSError:
        pass
    return datetime.fromtimestamp((run_dir / "metrics.json").stat().st_mtime).strftime("%Y-%m-%d %H:%M")


def _split_name(file: str) -> str:
    m = re.search(r"r(\d+)-f(\d+)", Path(file).name)
    return f"r{m.group(1)}-f{m.group(2)}" if m else Path(file).stem


def _embed_png(run_dir: Path, rel: str) -> str | None:
    path = (run_dir / rel).resolve()
    if run_dir.resolve() not in path.parents or not path.is_file():
        return None
    return png_data_uri(path.read_bytes())


def _protocol_text(protocol: dict, n_splits: Any, cohort: dict) -> str:
    kind = protocol.get("kind")
    if kind == "group_kfold":
        text = (f"stratified {protocol.get('folds')}-fold CV grouped by patient × {protocol.get('repeats')} "
                f"repeats = {n_splits} splits")
    elif kind == "leave_one_site_out":
        text = f"leave-one-site-out: {n_splits} splits ({len(cohort.get('sites', {}))} sites)"
    elif kind == "balanced_test":
        text = (f"the BPD code's balanced test folds (positives in {protocol.get('folds')} chunks, as many negatives "
                f"each; surplus negatives untested) × {protocol.get('repeats')} repeats = {n_splits} splits")
    else:
        text = f"{kind}: {n_splits} splits"
    return text


def _cohort_cards(cohort: dict) -> list[dict]:
    cards = []
    if "patients" in cohort:
        cards.append({"label": "patients", "value": cohort["patients"],
                      "sub": f"{cohort.get('positive_patients', DASH)} positive · {cohort.get('negative_patients', DASH)} negative"})
    if "images" in cohort:
        cards.append({"label": "images", "value": cohort["images"],
                      "sub": f"{cohort.get('positive_images', DASH)} positive · {cohort.get('negative_images', DASH)} negative"})
    if cohort.get("patients") and "positive_patients" in cohort:
        sub = ""
        if cohort.get("images") and "positive_images" in cohort:
            sub = f"image level {fmt_num(100 * cohort['positive_images'] / cohort['images'], 1)} %"
        cards.append({"label": "prevalence (patients)",
                      "value": f"{fmt_num(100 * cohort['positive_patients'] / cohort['patients'], 1)} %", "sub": sub})
    if cohort.get("sites"):
        cards.append({"label": "sites", "value": len(cohort["sites"]), "sub": ""})
    return cards


def _site_rows(cohort: dict) -> list[dict]:
    rows = []
    for site, c in (cohort.get("sites") or {}).items():
        prev = (fmt_num(100 * c["positive_patients"] / c["patients"], 1) + " %"
                if c.get("patients") and "positive_patients" in c else DASH)
        rows.append({"site": site, "patients": c.get("patients", DASH), "positive": c.get("positive_patients", DASH),
                     "images": c.get("images", DASH), "prevalence": prev})
    return rows


# ---------------------------------------------------------------------------------------------
# The context the template renders


def _site_training_rows(arms: dict, order: list[str]) -> list[dict]:
    """Local and federated arms: how they trained across sites, and what crossed the wire."""
    rows = []
    for name in order:
        st = arms[name].get("sites_training")
        if not st:
            continue
        if st.get("mode") == "federated":
            per_fold, full = st.get("bytes_per_fold"), st.get("bytes_full_model_fedavg_per_fold")
            ratio = f"{full / per_fold:.0f}x less" if per_fold and full else DASH
            missing = st.get("rounds_with_missing_sites", 0)
            rows.append({"arm": name, "mode": f"federated ({st.get('strategy')}, BatchNorm {st.get('bn_stats')})",
                         "what": f"{fmt_num((per_fold or 0) / 1e6, 2)} MB per fold on the wire; full-model FedAvg "
                                 f"{fmt_num((full or 0) / 1e6, 1)} MB ({ratio})"
                                 + (f"; {missing} round(s) completed without every site" if missing else "")})
        else:
            cross = st.get("cross_site_auroc", {})
            text = "; ".join(f"{a} model: " + ", ".join(f"{b} {fmt_num(v)}" for b, v in row.items())
                             for a, row in cross.items())
            rows.append({"arm": name, "mode": "local (each site alone)", "what": f"cross-site AUROC: {text or DASH}"})
    return rows


def build_context(run_dir: str | Path) -> dict:
    """Everything the report shows, as formatted strings and embedded figures."""
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "metrics.json")
    if not metrics:
        raise FileNotFoundError(f"{run_dir}: no readable metrics.json; run the study to the end first")
    env = _read_json(run_dir / "environment.json")
    recipe_path = run_dir / "recipe.yaml"
    recipe_text = recipe_path.read_text() if recipe_path.is_file() else ""
    try:
        recipe = yaml.safe_load(recipe_text) or {}
    except yaml.YAMLError:
        recipe = {}
    recipe = shareable_recipe(recipe) if isinstance(recipe, dict) else {}
    if recipe:  # the report is shared: it shows the recipe without local paths
        recipe_text = yaml.safe_dump(recipe, sort_keys=False)

    arms: dict = metrics.get("arms", {})
    evidence: dict = metrics.get("evidence", {})
    ev: dict = evidence.get("units", {})
    cohort: dict = metrics.get("cohort", {})
    protocol: dict = metrics.get("protocol", {})
    n_splits = metrics.get("n_splits", DASH)
    order = ordered_units(arms)
    colors = palette(order)

    units = []
    for name in order:
        u, e = arms[name], ev.get(name, {})
        s = u.get("summary", {})
        short = [m for m in ("auroc", "balanced_accuracy", "f1") if finite(n_splits) and s.get(m, {}).get("n", n_splits) < n_splits]
        units.append({
            "name": name,
            "kind": u.get("kind", DASH),
            "backbone": u.get("backbone", DASH),
            "stages": " → ".join(u.get("stages", [])) or DASH,
            "labels": fmt_fraction(u["label_fraction"]) if u.get("kind") == "model" and "label_fraction" in u else "all",
            "auroc": fmt_mean_sd(s.get("auroc")),
            "balanced_accuracy": fmt_mean_sd(s.get("balanced_accuracy")),
            "f1": fmt_mean_sd(s.get("f1")),
            "auroc_bootstrap": fmt_point_ci(e.get("bootstrap_ci", {}).get("auroc")),
            "auroc_delong": fmt_ci(e.get("auroc_delong_ci", {}).get("low"), e.get("auroc_delong_ci", {}).get("high")),
            "short_note": ", ".join(f"{m.replace('_', ' ')} n = {s[m]['n']}" for m in short),
            "color": colors[name],
        })

    task_rows = [
        {"unit": name, "task": task, **{m: fmt_mean_sd(ts.get(m)) for m in ("auroc", "balanced_accuracy", "f1")},
         "pooled": fmt_point_ci(ev.get(name, {}).get("tasks", {}).get(task, {}).get("bootstrap_ci", {}).get("auroc"))}
        for name in order for task, ts in (arms[name].get("tasks") or {}).items()
    ]
    resource_rows = [
        {"unit": name, "stage": stage.split(":", 1)[-1], "seconds": fmt_num(r.get("median_seconds_per_fold"), 1),
         "rss": fmt_num(r["peak_rss_bytes"] / 2**30, 2) if r.get("peak_rss_bytes") else DASH,
         "cuda": fmt_num(r["cuda_max_allocated_bytes"] / 2**30, 2) if r.get("cuda_max_allocated_bytes") else DASH,
         "saved_peak": fmt_num(r["saved_activation_peak_bytes"] / 2**20, 1) if r.get("saved_activation_peak_bytes") else DASH,
         "saved_median": fmt_num(r["saved_activation_median_bytes"] / 2**20, 1) if r.get("saved_activation_median_bytes") else DASH}
        for name in order for stage, r in (arms[name].get("resources") or {}).items()
    ]

    pooled = []
    for name in order:
        e = ev.get(name, {})
        b = e.get("bootstrap_ci", {})
        pc = lambda x: {"point": fmt_num((x or {}).get("point")),  # noqa: E731
                        "ci": fmt_ci((x or {}).get("low"), (x or {}).get("high"))}
        pooled.append({
            "name": name, "n_patients": e.get("n_patients", DASH), "n_positive": e.get("n_positive", DASH),
            "cells": [pc(e.get("auroc_delong_ci")), pc(b.get("auroc")), pc(b.get("balanced_accuracy")), pc(b.get("f1"))],
        })

    clinical = [_clinical_row(name, arms[name].get("summary", {}), ev.get(name, {})) for name in order]

    comparisons = comparison_rows(evidence.get("comparisons", []), evidence.get("primary"))

    calibration = []
    for name in order:
        cal = ev.get(name, {}).get("calibration")
        if cal:
            calibration.append({
                "name": name, "slope": fmt_num(cal.get("slope"), 2), "slope_ci": fmt_ci(cal.get("slope_low"), cal.get("slope_high"), 2),
                "intercept": fmt_num(cal.get("intercept"), 2),
                "intercept_ci": fmt_ci(cal.get("intercept_low"), cal.get("intercept_high"), 2),
                "brier": fmt_num(cal.get("brier")),
            })

    curves = evidence.get("label_efficiency") or {}
    label_rows = [{"arm": arm, "fraction": fmt_fraction(r["fraction"]),
                   "auroc": fmt_mean_sd({"mean": r.get("auroc_mean"), "sd": r.get("auroc_sd")})}
                  for arm, rows in curves.items() for r in rows]

    r_arms = recipe_arms(recipe)
    tuning = []
    for name in order:
        u = arms[name]
        if not u.get("tuning"):
            continue
        keys = list(dict.fromkeys(k for t in u["tuning"] for k in t.get("chosen", {})))
        tune_cfg = (r_arms.get(u.get("base_arm")) or {}).get("tune") or {}
        grid = tune_cfg.get("grid") or {}
        tuning.append({
            "unit": name, "keys": keys,
            "grid": "; ".join(f"{k} ∈ {{{fmt_setting(v)}}}" for k, v in grid.items()),
            "inner_folds": tune_cfg.get("inner_folds", DASH),
            "rows": [{"split": f"r{t.get('repeat')}-f{t.get('fold')}",
                      "values": [fmt_setting(t.get("chosen", {}).get(k, DASH)) for k in keys]} for t in u["tuning"]],
        })

    saliency = []
    for name in order:
        items = arms[name].get("saliency") or []
        if not items:
            continue
        thresholds = {f"r{f.get('repeat')}-f{f.get('fold')}": f.get("threshold") for f in arms[name].get("folds", [])}
        groups = []
        for correct, label in ((True, "correct calls"), (False, "wrong calls")):
            shown = []
            for s in items:
                if bool(s.get("correct")) != correct:
                    continue
                split = _split_name(s.get("file", ""))
                call = "correct" if correct else "wrong"
                shown.append({  # captions name the fold, never the image file
                    "src": _embed_png(run_dir, s.get("file", "")),
                    "alt": f"Grad-CAM map, {name}, fold {split}, {call} call",
                    "where": f"fold {split}",
                    "caption": f"y = {s.get('y')} · p = {fmt_num(s.get('prob'))} · "
                               f"fold threshold {fmt_num(thresholds.get(split))}",
                })
            groups.append({"label": label, "items": shown, "correct": correct})
        saliency.append({"unit": name, "groups": groups})
    training_curves = [{"unit": n, "src": training_curve_figure(n, arms[n]["training_curves"], colors[n])}
                       for n in order if arms[n].get("training_curves")]
    training_curves = [t for t in training_curves if t["src"]]

    splits = []
    for name in order:
        for f in arms[name].get("folds", []):
            key = f"r{f.get('repeat')}-f{f.get('fold')}"
            if key not in splits:
                splits.append(key)
    fold_rows = []
    for key in splits:
        row = []
        for name in order:
            f = next((f for f in arms[name].get("folds", []) if f"r{f.get('repeat')}-f{f.get('fold')}" == key), None)
            row.append(fmt_num(f.get("auroc")) if f else DASH)
        fold_rows.append({"split": key, "values": row})

    figures = {
        "roc": roc_figure([n for n in order if is_full_label(arms[n])], ev, colors),
        "calibration": calibration_figure([n for n in order if arms[n].get("kind") != "baseline"], ev, colors),
        "decision": decision_figure([n for n in order if arms[n].get("kind") != "baseline"], ev, colors),
        "label_efficiency": label_efficiency_figure(curves, colors),
        "sites": site_forest_figure([n for n in order if is_full_label(arms[n])], ev, colors),
    }
    sampling = evidence.get("sampling") or {}
    shifted = {n: s["prior_shift"] for n, s in sampling.items() if s.get("prior_shift")}
    corrected = [n for n in order if n in shifted]
    figures["calibration_corrected"] = calibration_figure(corrected, shifted, colors, "Calibration, prior-shift corrected")
    figures["decision_corrected"] = decision_figure(corrected, shifted, colors, "Decision curves, prior-shift corrected")
    refitted = {n: s["recalibrated"] for n, s in sampling.items() if s.get("recalibrated")}
    shown = [n for n in order if n in refitted]
    figures["calibration_recalibrated"] = calibration_figure(shown, refitted, colors, "Calibration, recalibrated in-study")
    figures["decision_recalibrated"] = decision_figure(shown, refitted, colors, "Decision curves, recalibrated in-study")

    ctx = {
        "title": metrics.get("recipe", run_dir.name),
        "date": _run_date(run_dir),
        "generated": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "run_dir": run_dir.resolve().name,  # the folder name only: a shared report carries no local path
        "seed": metrics.get("seed", env.get("seed", DASH)),
        "compute": metrics.get("compute", DASH),
        "version": env.get("stagewise", ""),
        "cohort_cards": _cohort_cards(cohort),
        "sites": _site_rows(cohort),
        "protocol": _protocol_text(protocol, n_splits, cohort),
        "protocol_details": [
            ("test images", {"all": "every image of a test patient", "first": "the first image of each test patient"}
             .get(protocol.get("test_images"), protocol.get("test_images", DASH))),
            ("patient score", f"{protocol.get('patient_aggregate', DASH)} of the patient's image scores"),
            ("decision threshold",
             f"{fmt_setting(protocol.get('threshold', DASH))}, chosen on the training part of each fold"),
        ],
        "n_splits": n_splits,
        "patient_level": evidence.get("patient_level", ""),
        "units": units,
        "pooled": pooled,
        "clinical": clinical if any(r["cells"][0]["folds"] != DASH for r in clinical) else [],
        "task_rows": task_rows,
        "resource_rows": resource_rows,
        "comparisons": comparisons,
        "primary_text": primary_text(evidence.get("primary")),
        "multiplicity": evidence.get("multiplicity", ""),
        "flag_notes": unit_flag_notes(ev, order),
        "calibration": calibration,
        "calibration_corrected": corrected_calibration_rows(sampling, order),
        "sampling_notes": sampling_notes(sampling, order),
        "label_rows": label_rows,
        "site_training": _site_training_rows(arms, order),
        "tuning": tuning,
        "saliency": saliency,
        "saliency_colorbar": saliency_colorbar() if saliency else None,
        "training_curves": training_curves,
        "fold_units": order,
        "fold_rows": fold_rows,
        "figures": figures,
        "recipe_text": recipe_text,
        "environment": [(k, fmt_setting(v)) for k, v in env.items() if k != "compute_choice"],
        "compute_choices": _compute_rows(metrics.get("compute_choice") or {}),
        "wall_seconds": fmt_num(metrics.get("wall_seconds_this_session"), 0),
        "train_seconds": [(n, fmt_num(arms[n].get("train_seconds"), 1)) for n in order],
    }
    ctx["checklist_auto"], ctx["checklist_user"] = checklist(metrics, recipe, ctx)
    ctx["nav"] = [(i, label) for i, label, show in [
        ("summary", "Summary", True), ("comparisons", "Comparisons", bool(comparisons)),
        ("discrimination", "ROC", bool(figures["roc"] or pooled)),
        ("calibration", "Calibration & utility", bool(figures["calibration"] or figures["decision"])),
        ("label-efficiency", "Label efficiency", bool(figures["label_efficiency"])),
        ("sites", "Sites", bool(figures["sites"])),
        ("tuning", "Nested CV", bool(tuning)), ("training-curves", "Training curves", bool(training_curves)),
        ("saliency", "Saliency", bool(saliency)),
        ("checklist", "TRIPOD+AI / CLAIM", True), ("recipe", "Recipe & versions", True),
    ] if show]
    return ctx


CLINICAL_METRICS = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "auprc")


def _clinical_row(name: str, summary: dict, evidence: dict) -> dict:
    """One unit at its decision thresholds: each rate as fold mean ± sd and pooled point [CI],
    and the pooled confusion counts (values of metrics.json, formatted)."""
    counts = evidence.get("confusion") or {}
    cells = [{"metric": m, "folds": fmt_mean_sd(summary.get(m)),
              "pooled": fmt_point_ci((evidence.get("bootstrap_ci") or {}).get(m))} for m in CLINICAL_METRICS]
    return {"name": name, "cells": cells,
            "counts": [{"name": c, "value": counts.get(c, DASH)} for c in ("tp", "fp", "tn", "fn")]}
