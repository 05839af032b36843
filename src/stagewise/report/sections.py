"""The report's sections as template rows: one function per table, figure set or panel.

`context.build_context` calls these in page order and hands each the values of metrics.json it
shows; nothing here reads a file (see `run_files`) or recomputes a number: values are only
formatted (formatting.py), so that each table can be checked on its own.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from stagewise.report.figures import (
    calibration_figure,
    decision_figure,
    label_efficiency_figure,
    roc_figure,
    site_forest_figure,
    training_curve_figure,
)
from stagewise.report.thresholds import threshold_words
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
from stagewise.report.run_files import embed_png, run_date, split_name
from stagewise.report.unit_order import is_full_label
from stagewise.report.wording import compute_text, header_compute, mixed_compute_notes
from stagewise.text import counted

CLINICAL_METRICS = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "auprc")

# ---------------------------------------------------------------------------------------------
# The run: header, cohort, protocol, compute


def compute_rows(choices: dict) -> list[dict]:
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


def protocol_text(protocol: dict, n_splits: Any, cohort: dict) -> str:
    """The validation protocol in one line (kind, folds, repeats, number of splits)."""
    kind = protocol.get("kind")
    if kind == "group_kfold":
        text = (f"stratified {protocol.get('folds')}-fold CV grouped by patient × "
                f"{counted(protocol.get('repeats'), 'repeat')} = {n_splits} splits")
    elif kind == "leave_one_site_out":
        text = f"leave-one-site-out: {n_splits} splits ({len(cohort.get('sites', {}))} sites)"
    elif kind == "balanced_test":
        text = (f"the BPD code's balanced test folds (positives in {protocol.get('folds')} chunks, as many negatives "
                f"each; surplus negatives untested) × {counted(protocol.get('repeats'), 'repeat')} = {n_splits} splits")
    else:
        text = f"{kind}: {n_splits} splits"
    return text


def cohort_cards(cohort: dict) -> list[dict]:
    """The summary's cohort cards: patients, images, prevalence and sites, where recorded."""
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


def site_rows(cohort: dict) -> list[dict]:
    """One row per site: patients, positives, images and prevalence."""
    rows = []
    for site, c in (cohort.get("sites") or {}).items():
        prev = (fmt_num(100 * c["positive_patients"] / c["patients"], 1) + " %"
                if c.get("patients") and "positive_patients" in c else DASH)
        rows.append({"site": site, "patients": c.get("patients", DASH), "positive": c.get("positive_patients", DASH),
                     "images": c.get("images", DASH), "prevalence": prev})
    return rows


def run_header(run_dir: Path, metrics: dict, env: dict, cohort: dict, protocol: dict, n_splits: Any) -> dict:
    """The context's first entries: what ran, when, and on which cohort under which protocol."""
    return {
        "title": metrics.get("recipe", run_dir.name),
        "date": run_date(run_dir),
        "generated": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "run_dir": run_dir.resolve().name,  # the folder name only: a shared report carries no local path
        "seed": metrics.get("seed", env.get("seed", DASH)),
        "compute": header_compute(metrics),
        "version": env.get("stagewise", ""),
        "cohort_cards": cohort_cards(cohort),
        "sites": site_rows(cohort),
        "protocol": protocol_text(protocol, n_splits, cohort),
        "protocol_details": [
            ("test images", {"all": "every image of a test patient", "first": "the first image of each test patient"}
             .get(protocol.get("test_images"), protocol.get("test_images", DASH))),
            ("patient score", f"{protocol.get('patient_aggregate', DASH)} of the patient's image scores"),
            ("decision threshold", threshold_words(protocol)),
        ],
        "n_splits": n_splits,
    }


def run_footer(metrics: dict, env: dict, arms: dict, order: list[str], recipe_text: str) -> dict:
    """The context's last entries: the recipe, the software versions and the time it took."""
    return {
        "recipe_text": recipe_text,
        "environment": [(k, fmt_setting(v)) for k, v in env.items() if k not in ("compute_choice", "folds_compute")],
        "compute_choices": compute_rows(metrics.get("compute_choice") or {}),
        "wall_seconds": fmt_num(metrics.get("wall_seconds_this_session"), 0),
        "train_seconds": [(n, fmt_num(arms[n].get("train_seconds"), 1), compute_text(arms[n].get("compute")) or DASH)
                          for n in order],
        "compute_notes": mixed_compute_notes(arms, order),
    }


# ---------------------------------------------------------------------------------------------
# Results: one table per question


def unit_rows(arms: dict, ev: dict, order: list[str], n_splits: Any, colors: dict) -> list[dict]:
    """The arms table: one row per unit with its fold mean ± sd and pooled AUROC intervals."""
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
    return units


def task_rows(arms: dict, ev: dict, order: list[str]) -> list[dict]:
    """One row per unit and extra outcome (multi-task arms)."""
    return [
        {"unit": name, "task": task, **{m: fmt_mean_sd(ts.get(m)) for m in ("auroc", "balanced_accuracy", "f1")},
         "pooled": fmt_point_ci(ev.get(name, {}).get("tasks", {}).get(task, {}).get("bootstrap_ci", {}).get("auroc"))}
        for name in order for task, ts in (arms[name].get("tasks") or {}).items()
    ]


def resource_rows(arms: dict, order: list[str]) -> list[dict]:
    """One row per unit and stage: seconds per fold and peak memory (GiB, saved activations MiB)."""
    return [
        {"unit": name, "stage": stage.split(":", 1)[-1], "seconds": fmt_num(r.get("median_seconds_per_fold"), 1),
         "rss": fmt_num(r["peak_rss_bytes"] / 2**30, 2) if r.get("peak_rss_bytes") else DASH,
         "cuda": fmt_num(r["cuda_max_allocated_bytes"] / 2**30, 2) if r.get("cuda_max_allocated_bytes") else DASH,
         "saved_peak": fmt_num(r["saved_activation_peak_bytes"] / 2**20, 1) if r.get("saved_activation_peak_bytes") else DASH,
         "saved_median": fmt_num(r["saved_activation_median_bytes"] / 2**20, 1) if r.get("saved_activation_median_bytes") else DASH}
        for name in order for stage, r in (arms[name].get("resources") or {}).items()
    ]


def pooled_rows(ev: dict, order: list[str]) -> list[dict]:
    """One row per unit over the pooled out-of-fold patients: point and 95 % CI per metric."""
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
    return pooled


def clinical_row(name: str, summary: dict, evidence: dict) -> dict:
    """One unit at its decision thresholds: each rate as fold mean ± sd and pooled point [CI],
    and the pooled confusion counts (values of metrics.json, formatted)."""
    counts = evidence.get("confusion") or {}
    cells = [{"metric": m, "folds": fmt_mean_sd(summary.get(m)),
              "pooled": fmt_point_ci((evidence.get("bootstrap_ci") or {}).get(m))} for m in CLINICAL_METRICS]
    return {"name": name, "cells": cells,
            "counts": [{"name": c, "value": counts.get(c, DASH)} for c in ("tp", "fp", "tn", "fn")]}


def calibration_rows(ev: dict, order: list[str]) -> list[dict]:
    """Calibration slope, intercept (with CIs) and Brier score of each unit that has them."""
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
    return calibration


def label_efficiency_rows(curves: dict) -> list[dict]:
    """AUROC at each label fraction, per arm."""
    return [{"arm": arm, "fraction": fmt_fraction(r["fraction"]),
             "auroc": fmt_mean_sd({"mean": r.get("auroc_mean"), "sd": r.get("auroc_sd")})}
            for arm, rows in curves.items() for r in rows]


def tuning_rows(arms: dict, order: list[str], r_arms: dict) -> list[dict]:
    """Nested CV: per tuned unit the grid, the inner folds and the setting chosen in each split."""
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
    return tuning


def site_training_rows(arms: dict, order: list[str]) -> list[dict]:
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
            what = "cross-site AUROC: the matrix below" if st.get("cross_site_auroc") else f"cross-site AUROC: {DASH}"
            rows.append({"arm": name, "mode": "local (each site alone)", "what": what})
    return rows


def saliency_sections(run_dir: Path, arms: dict, order: list[str]) -> list[dict]:
    """Grad-CAM maps per unit, correct and wrong calls apart, embedded; captions name the fold."""
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
                split = split_name(s.get("file", ""))
                call = "correct" if correct else "wrong"
                shown.append({  # captions name the fold, never the image file
                    "src": embed_png(run_dir, s.get("file", "")),
                    "alt": f"Grad-CAM map, {name}, fold {split}, {call} call",
                    "where": f"fold {split}" + (f", site {s['site']}, final global model" if s.get("site") else ""),
                    "caption": f"y = {s.get('y')} · p = {fmt_num(s.get('prob'))} · "
                               f"fold threshold {fmt_num(thresholds.get(split))}",
                })
            groups.append({"label": label, "items": shown, "correct": correct})
        saliency.append({"unit": name, "groups": groups})
    return saliency


def training_curve_rows(arms: dict, order: list[str], colors: dict) -> list[dict]:
    """One loss-curve figure per unit that logged its training (units without a figure left out)."""
    training_curves = [{"unit": n, "src": training_curve_figure(n, arms[n]["training_curves"], colors[n])}
                       for n in order if arms[n].get("training_curves")]
    return [t for t in training_curves if t["src"]]


def fold_table(arms: dict, order: list[str]) -> list[dict]:
    """AUROC per split (rows) and unit (columns), a dash where a unit lacks the split."""
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
    return fold_rows


def figure_set(arms: dict, ev: dict, order: list[str], colors: dict, curves: dict, sampling: dict) -> dict:
    """The embedded figures, drawn in page order: ROC, calibration and decision curves (also
    prior-shift corrected and recalibrated where the run has them), label efficiency, sites."""
    figures = {
        "roc": roc_figure([n for n in order if is_full_label(arms[n])], ev, colors),
        "calibration": calibration_figure([n for n in order if arms[n].get("kind") != "baseline"], ev, colors),
        "decision": decision_figure([n for n in order if arms[n].get("kind") != "baseline"], ev, colors),
        "label_efficiency": label_efficiency_figure(curves, colors),
        "sites": site_forest_figure([n for n in order if is_full_label(arms[n])], ev, colors),
    }
    shifted = {n: s["prior_shift"] for n, s in sampling.items() if s.get("prior_shift")}
    corrected = [n for n in order if n in shifted]
    figures["calibration_corrected"] = calibration_figure(corrected, shifted, colors, "Calibration, prior-shift corrected")
    figures["decision_corrected"] = decision_figure(corrected, shifted, colors, "Decision curves, prior-shift corrected")
    refitted = {n: s["recalibrated"] for n, s in sampling.items() if s.get("recalibrated")}
    shown = [n for n in order if n in refitted]
    figures["calibration_recalibrated"] = calibration_figure(shown, refitted, colors, "Calibration, recalibrated in-study")
    figures["decision_recalibrated"] = decision_figure(shown, refitted, colors, "Decision curves, recalibrated in-study")
    return figures


def nav_items(comparisons: list, figures: dict, pooled: list, tuning: list, training_curves: list,
              saliency: list, conclusions: bool = False) -> list[tuple[str, str]]:
    """The page's table of contents: only the sections this run has something to show in."""
    return [(i, label) for i, label, show in [
        ("conclusions", "Conclusions", conclusions),
        ("summary", "Summary", True), ("comparisons", "Comparisons", bool(comparisons)),
        ("discrimination", "ROC", bool(figures["roc"] or pooled)),
        ("calibration", "Calibration & utility", bool(figures["calibration"] or figures["decision"])),
        ("label-efficiency", "Label efficiency", bool(figures["label_efficiency"])),
        ("sites", "Sites", bool(figures["sites"])),
        ("tuning", "Nested CV", bool(tuning)), ("training-curves", "Training curves", bool(training_curves)),
        ("saliency", "Saliency", bool(saliency)),
        ("checklist", "TRIPOD+AI / CLAIM", True), ("recipe", "Recipe & versions", True),
    ] if show]
