"""One self-contained HTML report per finished run: `write_report(run_dir)`.

The report reads what the run wrote (metrics.json, recipe.yaml, environment.json, log.txt and
the saliency PNGs) and recomputes nothing: every number shown is a value of metrics.json,
formatted by the helpers below (the only derived numbers are the cohort prevalences, a ratio
of two counts in metrics.json). Figures are PNGs drawn with matplotlib's Agg canvas (no
pyplot, so the caller's backend is left alone) and embedded as base64, so the file opens
offline, with no external CSS, JavaScript or fonts. All text from the run (study, arm and
column names, the recipe) goes through jinja2's autoescaping.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import yaml

REPORT_NAME = "report.html"
KIND_ORDER = {"model": 0, "clinical": 1, "baseline": 2}
DPI = 100
MINUS = "\u2212"
DASH = "\u2014"  # shown where a value is missing (not computed, or NaN)

# ---------------------------------------------------------------------------------------------
# Number formatting: the tests format metrics.json values with these same functions.


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_num(x: Any, digits: int = 3) -> str:
    """`0.969`, `−0.007` (a true minus sign); a dash for missing or non-finite values."""
    if not _finite(x):
        return DASH
    text = f"{x:.{digits}f}"
    if text.startswith("-"):
        text = text[1:] if float(text) == 0 else MINUS + text[1:]
    return text


def fmt_mean_sd(stats: dict | None, digits: int = 3) -> str:
    """`0.996 ± 0.008` from a summary entry {mean, sd, ...}."""
    if not stats or not _finite(stats.get("mean")):
        return DASH
    return f"{fmt_num(stats['mean'], digits)} ± {fmt_num(stats.get('sd'), digits)}"


def fmt_ci(low: Any, high: Any, digits: int = 3) -> str:
    """`[0.925, 0.998]`."""
    if not (_finite(low) and _finite(high)):
        return DASH
    return f"[{fmt_num(low, digits)}, {fmt_num(high, digits)}]"


def fmt_point_ci(entry: dict | None, digits: int = 3) -> str:
    """`0.969 [0.925, 0.998]` from {point, low, high}."""
    if not entry or not _finite(entry.get("point")):
        return DASH
    return f"{fmt_num(entry['point'], digits)} {fmt_ci(entry.get('low'), entry.get('high'), digits)}"


def fmt_p(p: Any) -> str:
    """`< 0.001` below one in a thousand, else three decimals."""
    if not _finite(p):
        return DASH
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def fmt_fraction(f: Any) -> str:
    """A label fraction as a percentage: `25 %`, `100 %`, `12.5 %`."""
    if not _finite(f):
        return DASH
    return f"{f * 100:.4g} %"


def _g(v: Any) -> str:
    """A recipe setting as written (numbers in short general form)."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_g(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_g(x) for x in v)
    return str(v)


# ---------------------------------------------------------------------------------------------
# Figures


def _mpl_text(s: str) -> str:
    return str(s).replace("$", r"\$")  # user text must not switch matplotlib into mathtext


_STYLE = {
    "font.size": 8.5,
    "axes.titlesize": 9.5,
    "axes.labelsize": 8.5,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e6e8eb",
    "grid.linewidth": 0.6,
    "axes.edgecolor": "#8a8f98",
    "axes.linewidth": 0.7,
    "font.family": ["DejaVu Sans"],
}


def _figure(width: float = 5.0, height: float = 4.1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.06, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _palette(names: list[str]) -> dict[str, str]:
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
              "#bcbd22", "#7f7f7f"]
    return {n: colors[i % len(colors)] for i, n in enumerate(names)}


def _roc_figure(units: list[str], ev: dict, colors: dict) -> str | None:
    shown = [u for u in units if ev.get(u, {}).get("roc")]
    if not shown:
        return None
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        fig, ax = _figure()
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="#9aa0a6")
        for u in shown:
            roc = ev[u]["roc"]
            point = ev[u].get("auroc_delong_ci", {}).get("point")
            ax.fill_between(roc["fpr"], roc["tpr_low"], roc["tpr_high"], color=colors[u], alpha=0.13, lw=0)
            ax.plot(roc["fpr"], roc["tpr"], color=colors[u], lw=1.6,
                    label=_mpl_text(f"{u}  (AUROC {fmt_num(point)})"))
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity (false-positive rate)",
               ylabel="sensitivity (true-positive rate)", title="ROC, pooled patients, 95 % bootstrap band")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", frameon=False)
        return _png(fig)


def _calibration_figure(units: list[str], ev: dict, colors: dict) -> str | None:
    shown = [u for u in units if ev.get(u, {}).get("calibration_curve")]
    if not shown:
        return None
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        fig, ax = _figure()
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="#9aa0a6", label="perfect calibration")
        for u in shown:
            c = ev[u]["calibration_curve"]
            ax.plot(c["prob_pred"], c["prob_true"], marker="o", ms=3.5, lw=1.3, color=colors[u], label=_mpl_text(u))
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="mean predicted probability", ylabel="observed fraction positive",
               title="Calibration (quantile bins of patients)")
        ax.set_aspect("equal")
        ax.legend(loc="upper left", frameon=False)
        return _png(fig)


def _decision_figure(units: list[str], ev: dict, colors: dict) -> str | None:
    shown = [u for u in units if ev.get(u, {}).get("decision_curve")]
    if not shown:
        return None
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        fig, ax = _figure(5.0, 4.1)
        ref = ev[shown[0]]["decision_curve"]
        tops = [max(ref["net_benefit_all"], default=0)]
        for u in shown:
            d = ev[u]["decision_curve"]
            ax.plot(d["threshold"], d["net_benefit_model"], color=colors[u], lw=1.5, label=_mpl_text(u))
            tops.append(max(d["net_benefit_model"], default=0))
        ax.plot(ref["threshold"], ref["net_benefit_all"], color="#333333", lw=1.0, ls="-.", label="treat all")
        ax.plot(ref["threshold"], ref["net_benefit_none"], color="#333333", lw=1.0, ls=":", label="treat none")
        top = max(max(tops), 0.01)
        ax.set_ylim(-0.15 * top, 1.08 * top)
        ax.set_xlim(min(ref["threshold"]), max(ref["threshold"]))
        ax.set(xlabel="threshold probability", ylabel="net benefit", title="Decision curves")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        return _png(fig)


def _label_efficiency_figure(curves: dict, colors: dict) -> str | None:
    if not curves:
        return None
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        fig, ax = _figure(5.0, 3.7)
        fractions = sorted({r["fraction"] for c in curves.values() for r in c})
        for i, (arm, rows) in enumerate(curves.items()):
            x = [r["fraction"] * (1 + 0.025 * (i - (len(curves) - 1) / 2)) for r in rows]  # dodge overlapping bars
            sd = [r["auroc_sd"] if _finite(r["auroc_sd"]) else 0.0 for r in rows]
            ax.errorbar(x, [r["auroc_mean"] for r in rows], yerr=sd, marker="o", ms=4, lw=1.4, capsize=3,
                        color=colors.get(arm, None), label=_mpl_text(arm))
        ax.axhline(0.5, ls="--", lw=0.8, color="#9aa0a6")
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([fmt_fraction(f) for f in fractions])
        ax.minorticks_off()
        ax.set_xlim(min(fractions) / 1.35, max(fractions) * 1.35)
        ax.set(xlabel="fraction of training labels (log scale)", ylabel="AUROC, fold mean ± sd",
               title="Label efficiency")
        ax.legend(loc="lower right", frameon=False)
        return _png(fig)


# ---------------------------------------------------------------------------------------------
# Reading the run


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


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


def _ordered_units(arms: dict) -> list[str]:
    names = list(arms)
    return sorted(names, key=lambda n: (KIND_ORDER.get(arms[n].get("kind"), 3), names.index(n)))


def _is_full_label(unit: dict) -> bool:
    return unit.get("kind") != "model" or unit.get("label_fraction", 1.0) == 1.0


def _split_name(file: str) -> str:
    m = re.search(r"r(\d+)-f(\d+)", Path(file).name)
    return f"r{m.group(1)}-f{m.group(2)}" if m else Path(file).stem


def _embed_png(run_dir: Path, rel: str) -> str | None:
    path = (run_dir / rel).resolve()
    if run_dir.resolve() not in path.parents or not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _protocol_text(protocol: dict, n_splits: Any, cohort: dict) -> str:
    kind = protocol.get("kind")
    if kind == "group_kfold":
        text = (f"stratified {protocol.get('folds')}-fold CV grouped by patient × {protocol.get('repeats')} "
                f"repeats = {n_splits} splits")
    elif kind == "leave_one_site_out":
        text = f"leave-one-site-out: {n_splits} splits ({len(cohort.get('sites', {}))} sites)"
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


def _recipe_arms(recipe: dict) -> dict[str, dict]:
    return {a.get("name"): a for a in recipe.get("arms") or [] if isinstance(a, dict)}


def _stage_text(stage: dict) -> dict:
    aug = stage.get("augment") or {}
    active = [f"{k} {_g(v)}" if not isinstance(v, bool) else k for k, v in aug.items() if v]
    mix = []
    for name in ("cutmix", "mixup"):
        cfg = stage.get(name)
        mix.append(f"{'CutMix' if name == 'cutmix' else 'MixUp'} α {_g(cfg.get('alpha'))} on {_g(cfg.get('p'))} of batches"
                   if cfg else f"{'CutMix' if name == 'cutmix' else 'MixUp'} off")
    training = f"{stage.get('epochs')} epochs, batch {stage.get('batch_size')}, lr {_g(stage.get('lr'))}"
    if stage.get("lr_decay") is not None:
        training += f" (decay {_g(stage['lr_decay'])} per group)"
    training += f", {stage.get('schedule')} schedule, weight decay {_g(stage.get('weight_decay'))}, BN {stage.get('bn')}"
    if stage.get("unfreeze"):
        training += f"; unfreeze {_g(stage['unfreeze'])} (fraction of the stage's epochs)"
    if stage.get("balanced_sampling"):
        training += "; class-balanced sampling"
    return {"kind": stage.get("kind"), "training": training,
            "augment": ", ".join(active) if active else "none", "mix": "; ".join(mix)}


# ---------------------------------------------------------------------------------------------
# The context the template renders


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
    recipe = recipe if isinstance(recipe, dict) else {}

    arms: dict = metrics.get("arms", {})
    evidence: dict = metrics.get("evidence", {})
    ev: dict = evidence.get("units", {})
    cohort: dict = metrics.get("cohort", {})
    protocol: dict = metrics.get("protocol", {})
    n_splits = metrics.get("n_splits", DASH)
    order = _ordered_units(arms)
    colors = _palette(order)

    units = []
    for name in order:
        u, e = arms[name], ev.get(name, {})
        s = u.get("summary", {})
        short = [m for m in ("auroc", "balanced_accuracy", "f1") if _finite(n_splits) and s.get(m, {}).get("n", n_splits) < n_splits]
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

    comparisons = []
    for c in evidence.get("comparisons", []):
        d, t, w = c.get("delong") or {}, c.get("corrected_t") or {}, c.get("wilcoxon") or {}
        comparisons.append({
            "a": c.get("a"), "b": c.get("b"), "n": c.get("n_patients", DASH),
            "delong_diff": fmt_num(d.get("diff")), "delong_ci": fmt_ci(d.get("ci_low"), d.get("ci_high")),
            "delong_p": fmt_p(d.get("p")),
            "t_diff": fmt_num(t.get("mean_diff")), "t_ci": fmt_ci(t.get("ci_low"), t.get("ci_high")),
            "t_p": fmt_p(t.get("p")), "t_df": t.get("df", DASH),
            "w_p": fmt_p(w.get("p")),
            "w_note": "" if w else "not computed: identical fold AUROCs or too few folds",
            "sig": {k: _finite(x.get("p")) and x["p"] < 0.05 for k, x in (("delong", d), ("t", t), ("w", w))},
        })

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

    r_arms = _recipe_arms(recipe)
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
            "grid": "; ".join(f"{k} ∈ {{{_g(v)}}}" for k, v in grid.items()),
            "inner_folds": tune_cfg.get("inner_folds", DASH),
            "rows": [{"split": f"r{t.get('repeat')}-f{t.get('fold')}",
                      "values": [_g(t.get("chosen", {}).get(k, DASH)) for k in keys]} for t in u["tuning"]],
        })

    saliency = []
    for name in order:
        items = arms[name].get("saliency") or []
        if not items:
            continue
        groups = []
        for correct, label in ((True, "correct calls"), (False, "wrong calls")):
            shown = []
            for s in items:
                if bool(s.get("correct")) != correct:
                    continue
                src = _embed_png(run_dir, s.get("file", ""))
                split = _split_name(s.get("file", ""))
                shown.append({
                    "src": src, "file": s.get("file", ""),
                    "alt": f"saliency map, {name}, {split} row {s.get('row')}, {'correct' if correct else 'wrong'}",
                    "where": f"{split} · row {s.get('row')}",
                    "caption": f"y = {s.get('y')} · p = {fmt_num(s.get('prob'))}",
                })
            groups.append({"label": label, "items": shown, "correct": correct})
        saliency.append({"unit": name, "groups": groups})

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
        "roc": _roc_figure([n for n in order if _is_full_label(arms[n])], ev, colors),
        "calibration": _calibration_figure([n for n in order if arms[n].get("kind") != "baseline"], ev, colors),
        "decision": _decision_figure([n for n in order if arms[n].get("kind") != "baseline"], ev, colors),
        "label_efficiency": _label_efficiency_figure(curves, colors),
    }

    ctx = {
        "title": metrics.get("recipe", run_dir.name),
        "date": _run_date(run_dir),
        "generated": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "run_dir": str(run_dir.resolve()),
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
            ("decision threshold", f"{_g(protocol.get('threshold', DASH))}, chosen on the training part of each fold"),
        ],
        "n_splits": n_splits,
        "patient_level": evidence.get("patient_level", ""),
        "units": units,
        "pooled": pooled,
        "task_rows": task_rows,
        "resource_rows": resource_rows,
        "comparisons": comparisons,
        "calibration": calibration,
        "label_rows": label_rows,
        "tuning": tuning,
        "saliency": saliency,
        "fold_units": order,
        "fold_rows": fold_rows,
        "figures": figures,
        "recipe_text": recipe_text,
        "environment": [(k, _g(v)) for k, v in env.items()],
        "wall_seconds": fmt_num(metrics.get("wall_seconds_this_session"), 0),
        "train_seconds": [(n, fmt_num(arms[n].get("train_seconds"), 1)) for n in order],
    }
    ctx["checklist_auto"], ctx["checklist_user"] = _checklist(metrics, recipe, ctx)
    ctx["nav"] = [(i, label) for i, label, show in [
        ("summary", "Summary", True), ("comparisons", "Comparisons", bool(comparisons)),
        ("discrimination", "ROC", bool(figures["roc"] or pooled)),
        ("calibration", "Calibration & utility", bool(figures["calibration"] or figures["decision"])),
        ("label-efficiency", "Label efficiency", bool(figures["label_efficiency"])),
        ("tuning", "Nested CV", bool(tuning)), ("saliency", "Saliency", bool(saliency)),
        ("checklist", "TRIPOD+AI / CLAIM", True), ("recipe", "Recipe & versions", True),
    ] if show]
    return ctx


def _checklist(metrics: dict, recipe: dict, ctx: dict) -> tuple[list[dict], list[dict]]:
    arms, cohort, protocol = metrics.get("arms", {}), metrics.get("cohort", {}), metrics.get("protocol", {})
    evidence = metrics.get("evidence", {})
    ev = evidence.get("units", {})
    evaluation = recipe.get("evaluation") or {}
    r_cohort = recipe.get("cohort") or {}
    r_arms = _recipe_arms(recipe)
    order = _ordered_units(arms)
    models = [n for n in order if arms[n].get("kind") == "model"]
    auto: list[dict] = []

    def item(topic: str, guide: str, lines: list[str]) -> None:
        auto.append({"topic": topic, "guide": guide, "lines": [x for x in lines if x]})

    folds = next((arms[n].get("folds") for n in order if arms[n].get("folds")), [])
    n_test = sorted({f.get("n_test_patients") for f in folds if f.get("n_test_patients") is not None})
    full = [n for n in models if _is_full_label(arms[n])] or order
    n_train = sorted({f.get("n_train_patients") for n in full[:1] for f in arms[n].get("folds", [])
                      if f.get("n_train_patients") is not None})
    span = lambda v: DASH if not v else (str(v[0]) if len(v) == 1 else f"{v[0]}–{v[-1]}")  # noqa: E731
    item("Data partition", "TRIPOD+AI, CLAIM", [
        ctx["protocol"] + f"; split seed {metrics.get('seed', DASH)}",
        f"cohort: {cohort.get('patients', DASH)} patients ({cohort.get('positive_patients', DASH)} positive), "
        f"{cohort.get('images', DASH)} images",
        f"per split: {span(n_train)} training and {span(n_test)} test patients"
        + (" (full-label units; label-fraction units train on fewer)" if len(models) > len(full) else ""),
        f"test images: {ctx['protocol_details'][0][1]}; patient score: {ctx['protocol_details'][1][1]}",
    ])
    data = recipe.get("data") or {}
    if data:
        item("Image preprocessing", "CLAIM", [f"images resized to {data.get('image_size')} px ({data.get('resize')})"])
    item("Model and pretrained-weight source", "TRIPOD+AI, CLAIM", [
        f"{n}: backbone {arms[n].get('backbone')}"
        + (f", weights file {r_arms[arms[n]['base_arm']]['backbone'].get('weights')}"
           if (r_arms.get(arms[n].get("base_arm")) or {}).get("backbone", {}).get("weights") else "")
        + (lambda h: f"; head dropout {_g(h.get('dropout'))}, hidden {_g(h.get('hidden'))}" if h else "")(
            (r_arms.get(arms[n].get("base_arm")) or {}).get("head"))
        for n in models if _is_full_label(arms[n])
    ] or ["no image-model arms"])
    stage_lines, stop_lines = [], []
    for name, arm in r_arms.items():
        for i, stage in enumerate(arm.get("stages") or []):
            st = _stage_text(stage)
            stage_lines.append(f"{name}, stage {i + 1} ({st['kind']}): augmentation {st['augment']}; {st['mix']}")
            stop_lines.append(f"{name}, stage {i + 1} ({st['kind']}): {st['training']}")
    item("Augmentation and CutMix / MixUp", "CLAIM", stage_lines or ["not recorded (no recipe.yaml)"])
    item("Training and stopping rule", "TRIPOD+AI, CLAIM",
         ["fixed number of epochs per stage; the last-epoch model is evaluated (no early stopping)"] + stop_lines)
    tuned = [t for t in ctx["tuning"]]
    item("Hyperparameter selection", "TRIPOD+AI", [
        f"nested CV for {t['unit']}: {t['grid']} chosen by an inner {t['inner_folds']}-fold grouped CV "
        f"inside each outer training fold" for t in tuned
    ] or ["no tuning: every setting fixed in the recipe before the run"])
    item("Threshold selection", "TRIPOD+AI",
         [f"decision threshold {_g(protocol.get('threshold', DASH))}, chosen on the training part of each fold "
          "(never on its test part); balanced accuracy and F1 use it"])
    baselines = [n for n in order if arms[n].get("kind") == "baseline"]
    clinical = [n for n in order if arms[n].get("kind") == "clinical"]
    item("Comparators", "TRIPOD+AI", [
        f"routine-score baselines on the same folds: {', '.join(baselines)}" if baselines else "no routine-score baseline",
        (f"clinical-only logistic regression on {', '.join(r_cohort.get('clinical') or []) or 'clinical columns'} "
         "(median imputation and scaling fitted on each training part)") if clinical else "no clinical-only model",
    ])
    n_boot = evaluation.get("bootstrap")
    tests = [
        f"fold metrics: mean ± sd over {metrics.get('n_splits', DASH)} splits",
        f"patient-level 95 % bootstrap CIs ({n_boot} resamples of patients)" if n_boot else "bootstrap CIs off",
        "AUROC: DeLong 95 % CI; paired DeLong test on the same patients",
        "fold AUROC differences: Nadeau–Bengio corrected resampled t-test and Wilcoxon signed-rank test",
        f"{len(evidence.get('comparisons', []))} comparisons, reported without multiplicity correction",
        f"patient level: {evidence.get('patient_level')}" if evidence.get("patient_level") else "",
    ]
    item("Confidence intervals and tests", "TRIPOD+AI, CLAIM", tests)
    calibrated = [n for n in order if ev.get(n, {}).get("calibration")]
    item("Calibration and clinical utility", "TRIPOD+AI", [
        f"calibration curve, slope, intercept and Brier score for {', '.join(calibrated)}" if calibrated
        else "calibration not computed",
        "decision curves (net benefit vs treat-all / treat-none)" if any(ev.get(n, {}).get("decision_curve") for n in order) else "",
        "baseline scores are not probabilities: no calibration for them" if baselines else "",
    ])
    sal = {n: arms[n].get("saliency") or [] for n in models}
    item("Failure analysis", "CLAIM", [
        f"Grad-CAM maps for {sum(bool(s.get('correct')) for s in v)} correct and "
        f"{sum(not s.get('correct') for s in v)} wrong test images of {n}" for n, v in sal.items() if v
    ] or ["no saliency maps (evaluation.saliency 0 or backbone without spatial features)"])
    item("Software and compute", "TRIPOD+AI, CLAIM", [
        f"stagewise {ctx['version']}; " + ", ".join(f"{k} {v}" for k, v in ctx["environment"]
                                                    if k in ("python", "torch", "torchvision", "timm", "scikit-learn")),
        f"compute: {metrics.get('compute', DASH)}; seed {metrics.get('seed', DASH)}",
    ])
    user = [
        {"topic": "Eligibility criteria", "guide": "TRIPOD+AI, CLAIM", "hint": "inclusion and exclusion criteria; how patients were identified"},
        {"topic": "Outcome definition and timing", "guide": "TRIPOD+AI, CLAIM",
         "hint": f"what “{r_cohort.get('outcome', 'outcome')}” means, how and when it was assessed, by whom, blinded to the images?"},
        {"topic": "Data source and dates", "guide": "TRIPOD+AI, CLAIM", "hint": "institutions, scanners, acquisition period, image selection"},
        {"topic": "Missing data", "guide": "TRIPOD+AI", "hint": "how many values were missing and why; handling beyond median imputation"},
        {"topic": "Sample-size justification", "guide": "TRIPOD+AI", "hint": "why this number of patients and events suffices"},
        {"topic": "External validation", "guide": "TRIPOD+AI, CLAIM", "hint": "performance on data from another site or period, or why none"},
        {"topic": "Intended use", "guide": "TRIPOD+AI, CLAIM", "hint": "target population, clinical setting, the decision the model informs"},
    ]
    return auto, user


# ---------------------------------------------------------------------------------------------
# Template

TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="stagewise {{ version }}">
<title>{{ title }} · stagewise report</title>
<style>
:root { --ink:#1d2430; --muted:#5f6b7a; --faint:#8a94a3; --line:#dfe3e8; --soft:#f4f6f8; --accent:#1f5fa8; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin:0; background:#fff; color:var(--ink);
  font: 14px/1.45 "Segoe UI", Roboto, "Helvetica Neue", Arial, "Liberation Sans", sans-serif; }
main { max-width: 1220px; margin: 0 auto; padding: 22px 32px 60px; }
header.top { display:flex; justify-content:space-between; align-items:flex-end; gap:24px;
  border-bottom: 2px solid var(--ink); padding-bottom: 10px; }
.eyebrow { font-size: 11px; letter-spacing: .08em; text-transform: uppercase; color: var(--muted); margin:0 0 2px; }
h1 { font-size: 25px; line-height:1.2; margin: 0; font-weight: 650; }
.meta { color: var(--muted); font-size: 12.5px; margin-top: 5px; }
.meta b { color: var(--ink); font-weight: 600; }
.meta span + span::before { content: "·"; margin: 0 7px; color: var(--faint); }
.rundir { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 11.5px; color: var(--muted);
  text-align:right; max-width: 45%; word-break: break-all; }
nav { display:flex; flex-wrap:wrap; gap: 4px 16px; font-size: 12.5px; padding: 7px 0 0; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
section { margin-top: 22px; }
h2 { font-size: 17px; margin: 0 0 8px; font-weight: 650; }
h3 { font-size: 14px; margin: 14px 0 6px; font-weight: 650; }
p.note, .note { color: var(--muted); font-size: 12.5px; margin: 4px 0 8px; }
.cards { display:flex; gap: 12px; flex-wrap: wrap; margin: 12px 0 4px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 7px 14px 8px; min-width: 150px; background: var(--soft); }
.card .v { font-size: 21px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .l { font-size: 11px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); }
.card .s { font-size: 12px; color: var(--muted); }
.card.protocol { flex: 1 1 330px; }
.card.protocol .v { font-size: 13.5px; font-weight: 600; line-height: 1.35; padding-top: 2px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 9px; text-align: left; vertical-align: top; }
thead th { font-weight: 600; color: var(--muted); font-size: 12px; border-bottom: 1.5px solid var(--ink); white-space: nowrap; }
thead tr.group th { border-bottom: 1px solid var(--line); color: var(--ink); text-align:center; font-size: 11.5px;
  text-transform: uppercase; letter-spacing: .05em; padding-bottom: 3px; }
thead tr.group th.blank { border-bottom: none; }
tbody td { border-bottom: 1px solid var(--line); }
tbody tr.kind-sep td { border-top: 1.5px solid #b9c0c9; }
td.num, th.num { text-align: right; white-space: nowrap; }
td.unit { font-weight: 600; white-space: nowrap; }
td.unit i { display:inline-block; width: 9px; height: 9px; border-radius: 2px; margin-right: 7px; vertical-align: 0; }
td.small { font-size: 12px; color: var(--muted); }
.badge { display:inline-block; font-size: 11px; padding: 0 7px; border-radius: 9px; line-height: 17px; font-weight: 600; }
.badge.model { background:#e3edf9; color:#1f5fa8; } .badge.clinical { background:#e2f3e6; color:#1d7a3a; }
.badge.baseline { background:#eceef1; color:#4d5866; }
td.em { font-weight: 650; }
.sig { color: #1d7a3a; font-weight: 650; }
.figs { display:flex; flex-wrap: wrap; gap: 18px; align-items:flex-start; }
.figs figure { margin: 0; }
figure img { display:block; max-width: 100%; height:auto; }
.fig-table { flex: 1 1 360px; min-width: 0; }
td.pc span { color: var(--muted); font-size: 12px; }
.sal-arm { margin-bottom: 10px; }
.sal-row { display:flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
.sal-group { border: 1px solid var(--line); border-radius: 6px; padding: 6px 8px 8px; margin: 4px 10px 8px 0; display:inline-block; vertical-align: top; }
.sal-group h4 { margin: 0 0 4px; font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
.sal-group.ok h4 { color: #1d7a3a; } .sal-group.bad h4 { color: #b3261e; }
.sal-groups { display:flex; flex-wrap: wrap; gap: 0 12px; }
.sal-row figure { margin: 0; width: 124px; }
.sal-row img { width: 124px; }
.sal-row figcaption { font-size: 11px; line-height: 1.3; color: var(--muted); margin-top: 2px; }
ul.check { list-style: none; padding: 0; margin: 0; }
ul.check > li { display:grid; grid-template-columns: 22px 270px minmax(0, 1fr); gap: 0 10px; padding: 6px 0; border-bottom: 1px solid var(--line); }
ul.check .mark { font-weight: 700; }
ul.check.auto .mark { color: #1d7a3a; } ul.check.user .mark { color: #b26b00; }
ul.check .topic { font-weight: 600; } ul.check .guide { display:block; font-weight: 400; font-size: 11.5px; color: var(--faint); }
ul.check ul { margin: 0; padding-left: 16px; font-size: 13px; }
ul.check .hint { font-size: 13px; color: var(--muted); }
.write { display:inline-block; border: 1px dashed #d9a440; border-radius: 4px; color: #8a5a00; background: #fff8e8;
  font-size: 12px; padding: 0 6px; margin-right: 6px; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; font-size: 12px;
  line-height: 1.35; overflow: auto; max-height: 520px; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; }
details summary { cursor: pointer; color: var(--accent); font-size: 13px; margin: 6px 0; }
.two { display:grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 24px; }
@media (max-width: 900px) { .two { grid-template-columns: 1fr; } ul.check > li { grid-template-columns: 22px 1fr; }
  ul.check > li > :last-child { grid-column: 2; } }
@media print { nav { display:none; } section { break-inside: avoid-page; } }
footer { margin-top: 30px; color: var(--faint); font-size: 11.5px; border-top: 1px solid var(--line); padding-top: 8px; }
</style>
</head>
<body>
<main>
<header class="top" id="header">
  <div>
    <p class="eyebrow">stagewise study report</p>
    <h1 id="study-name">{{ title }}</h1>
    <div class="meta"><span>run <b>{{ date }}</b></span><span>seed <b>{{ seed }}</b></span><span>compute <b>{{ compute }}</b></span>{% if version %}<span>stagewise {{ version }}</span>{% endif %}</div>
  </div>
  <div class="rundir" title="run directory">{{ run_dir }}</div>
</header>
<nav>{% for id, label in nav %}<a href="#{{ id }}">{{ label }}</a>{% endfor %}</nav>

<section id="cohort">
  <div class="cards">
    {% for c in cohort_cards %}<div class="card"><div class="l">{{ c.label }}</div><div class="v">{{ c.value }}</div><div class="s">{{ c.sub }}</div></div>{% endfor %}
    <div class="card protocol"><div class="l">validation</div><div class="v">{{ protocol }}</div>
      <div class="s">{% for k, v in protocol_details %}{{ k }}: {{ v }}{% if not loop.last %} · {% endif %}{% endfor %}</div></div>
  </div>
  {% if sites %}
  <table id="sites-table" style="width:auto;margin-top:8px">
    <thead><tr><th>site</th><th class="num">patients</th><th class="num">positive</th><th class="num">prevalence</th><th class="num">images</th></tr></thead>
    <tbody>{% for s in sites %}<tr><td>{{ s.site }}</td><td class="num">{{ s.patients }}</td><td class="num">{{ s.positive }}</td><td class="num">{{ s.prevalence }}</td><td class="num">{{ s.images }}</td></tr>{% endfor %}</tbody>
  </table>
  {% endif %}
</section>

<section id="summary">
  <h2>Results per unit</h2>
  <table id="units-table">
    <thead>
      <tr class="group"><th class="blank" colspan="5"></th><th colspan="3">fold mean ± sd ({{ n_splits }} splits)</th><th colspan="2">AUROC, pooled patients</th></tr>
      <tr><th>unit</th><th>kind</th><th>backbone</th><th>stages</th><th class="num">labels</th>
        <th class="num">AUROC</th><th class="num">balanced acc.</th><th class="num">F1</th>
        <th class="num">point [95 % bootstrap CI]</th><th class="num">DeLong 95 % CI</th></tr>
    </thead>
    <tbody>
    {% for u in units %}
      <tr data-unit="{{ u.name }}"{% if not loop.first and u.kind != units[loop.index0 - 1].kind %} class="kind-sep"{% endif %}>
        <td class="unit" data-col="unit"><i style="background:{{ u.color }}"></i>{{ u.name }}</td>
        <td data-col="kind"><span class="badge {{ u.kind }}">{{ u.kind }}</span></td>
        <td class="small" data-col="backbone">{{ u.backbone }}</td>
        <td class="small" data-col="stages">{{ u.stages }}</td>
        <td class="num" data-col="labels">{{ u.labels }}</td>
        <td class="num em" data-col="auroc"{% if u.short_note %} title="{{ u.short_note }}"{% endif %}>{{ u.auroc }}</td>
        <td class="num" data-col="balanced_accuracy">{{ u.balanced_accuracy }}</td>
        <td class="num" data-col="f1">{{ u.f1 }}</td>
        <td class="num" data-col="auroc_bootstrap">{{ u.auroc_bootstrap }}</td>
        <td class="num" data-col="auroc_delong">{{ u.auroc_delong }}</td>
      </tr>
    {% endfor %}
    </tbody>
  </table>
  <p class="note">Fold columns: mean ± sd of the per-fold test metrics. Pooled columns: every patient's out-of-fold score{% if patient_level %} ({{ patient_level }}){% endif %}. Balanced accuracy and F1 use the threshold chosen on each training part.</p>
  {% if task_rows %}
  <h3>Extra outcomes (multi-task units), fold mean ± sd</h3>
  <table id="tasks-table" style="width:auto">
    <thead><tr><th>unit</th><th>outcome</th><th class="num">AUROC</th><th class="num">balanced acc.</th><th class="num">F1</th><th class="num">pooled AUROC [95 % bootstrap CI]</th></tr></thead>
    <tbody>{% for t in task_rows %}<tr data-unit="{{ t.unit }}"><td class="unit">{{ t.unit }}</td><td>{{ t.task }}</td><td class="num">{{ t.auroc }}</td><td class="num">{{ t.balanced_accuracy }}</td><td class="num">{{ t.f1 }}</td><td class="num">{{ t.pooled }}</td></tr>{% endfor %}</tbody>
  </table>
  {% endif %}
  {% if resource_rows %}
  <h3>Time and memory per stage</h3>
  <table id="resources-table" style="width:auto">
    <thead><tr><th>unit</th><th>stage</th><th class="num">median s / fold</th><th class="num">peak RSS (GiB)</th><th class="num">CUDA peak (GiB)</th><th class="num">saved activations, peak step (MiB)</th><th class="num">median step (MiB)</th></tr></thead>
    <tbody>{% for r in resource_rows %}<tr data-unit="{{ r.unit }}"><td class="unit">{{ r.unit }}</td><td>{{ r.stage }}</td><td class="num">{{ r.seconds }}</td><td class="num">{{ r.rss }}</td><td class="num">{{ r.cuda }}</td><td class="num">{{ r.saved_peak }}</td><td class="num">{{ r.saved_median }}</td></tr>{% endfor %}</tbody>
  </table>
  {% endif %}
</section>

{% if comparisons %}
<section id="comparisons">
  <h2>Comparisons</h2>
  <table id="comparisons-table">
    <thead>
      <tr class="group"><th class="blank" colspan="3"></th><th colspan="3">pooled patients, DeLong</th><th colspan="3">fold AUROCs, corrected resampled t</th><th>Wilcoxon</th></tr>
      <tr><th>A</th><th>vs B</th><th class="num">patients</th><th class="num">ΔAUROC</th><th class="num">95 % CI</th><th class="num">p</th>
        <th class="num">Δ mean</th><th class="num">95 % CI</th><th class="num">p</th><th class="num">p</th></tr>
    </thead>
    <tbody>
    {% for c in comparisons %}
      <tr data-a="{{ c.a }}" data-b="{{ c.b }}">
        <td class="unit" data-col="a">{{ c.a }}</td><td data-col="b">{{ c.b }}</td><td class="num">{{ c.n }}</td>
        <td class="num em" data-col="delong_diff">{{ c.delong_diff }}</td><td class="num" data-col="delong_ci">{{ c.delong_ci }}</td>
        <td class="num{% if c.sig.delong %} sig{% endif %}" data-col="delong_p">{{ c.delong_p }}</td>
        <td class="num" data-col="t_diff">{{ c.t_diff }}</td><td class="num" data-col="t_ci">{{ c.t_ci }}</td><td class="num{% if c.sig.t %} sig{% endif %}" data-col="t_p">{{ c.t_p }}</td>
        <td class="num{% if c.sig.w %} sig{% endif %}" data-col="w_p"{% if c.w_note %} title="{{ c.w_note }}"{% endif %}>{{ c.w_p }}</td>
      </tr>
    {% endfor %}
    </tbody>
  </table>
  <p class="note">Δ = A − B. DeLong: paired test on the patients both units scored. Corrected t: Nadeau–Bengio variance correction for overlapping training sets (df = splits − 1). Wilcoxon: signed-rank test on the same paired fold AUROCs. p &lt; 0.05 in green; p-values are not adjusted for multiple comparisons.</p>
</section>
{% endif %}

<section id="discrimination">
  <h2>Discrimination</h2>
  <div class="figs">
    {% if figures.roc %}<figure><img id="fig-roc" alt="ROC curves with 95 % bootstrap bands, full-label units" src="{{ figures.roc }}"></figure>{% endif %}
    <div class="fig-table">
      <h3>Pooled patient-level estimates, 95 % CIs</h3>
      <table id="pooled-table">
        <thead><tr><th>unit</th><th class="num">patients (pos.)</th><th class="num">AUROC, DeLong</th><th class="num">AUROC, bootstrap</th><th class="num">balanced acc.</th><th class="num">F1</th></tr></thead>
        <tbody>{% for p in pooled %}<tr data-unit="{{ p.name }}"><td class="unit">{{ p.name }}</td><td class="num">{{ p.n_patients }} ({{ p.n_positive }})</td>{% for c in p.cells %}<td class="num pc">{{ c.point }} <span>{{ c.ci }}</span></td>{% endfor %}</tr>{% endfor %}</tbody>
      </table>
      <p class="note">Balanced accuracy and F1 here use each patient's majority decision over repeats; the bootstrap resamples patients.</p>
      <details><summary>AUROC per split</summary>
        <table id="folds-table"><thead><tr><th>split</th>{% for n in fold_units %}<th class="num">{{ n }}</th>{% endfor %}</tr></thead>
        <tbody>{% for r in fold_rows %}<tr><td>{{ r.split }}</td>{% for v in r["values"] %}<td class="num">{{ v }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
      </details>
    </div>
  </div>
</section>

{% if figures.calibration or figures.decision %}
<section id="calibration">
  <h2>Calibration and clinical utility</h2>
  <div class="figs">
    {% if figures.calibration %}<figure><img id="fig-calibration" alt="calibration curves" src="{{ figures.calibration }}"></figure>{% endif %}
    {% if figures.decision %}<figure><img id="fig-decision" alt="decision curves: net benefit against threshold probability, with treat-all and treat-none" src="{{ figures.decision }}"></figure>{% endif %}
  </div>
  {% if calibration %}
  <table id="calibration-table" style="max-width:760px">
    <thead><tr><th>unit</th><th class="num">slope</th><th class="num">95 % CI</th><th class="num">intercept</th><th class="num">95 % CI</th><th class="num">Brier</th></tr></thead>
    <tbody>{% for c in calibration %}<tr data-unit="{{ c.name }}"><td class="unit">{{ c.name }}</td><td class="num em">{{ c.slope }}</td><td class="num">{{ c.slope_ci }}</td><td class="num em">{{ c.intercept }}</td><td class="num">{{ c.intercept_ci }}</td><td class="num">{{ c.brier }}</td></tr>{% endfor %}</tbody>
  </table>
  <p class="note">Slope 1 and intercept 0 are ideal; a slope below 1 means predictions too extreme, above 1 too modest; intercept below 0 means predictions too high on average. Wald 95 % CIs. Baseline scores are not probabilities and are left out.</p>
  {% endif %}
</section>
{% endif %}

{% if figures.label_efficiency %}
<section id="label-efficiency">
  <h2>Label efficiency</h2>
  <div class="figs">
    <figure><img id="fig-label-efficiency" alt="label-efficiency curve: AUROC against fraction of training labels" src="{{ figures.label_efficiency }}"></figure>
    <div class="fig-table">
      <table id="label-efficiency-table" style="width:auto">
        <thead><tr><th>arm</th><th class="num">labels</th><th class="num">AUROC mean ± sd</th></tr></thead>
        <tbody>{% for r in label_rows %}<tr><td class="unit">{{ r.arm }}</td><td class="num">{{ r.fraction }}</td><td class="num">{{ r.auroc }}</td></tr>{% endfor %}</tbody>
      </table>
      <p class="note">Each fraction of every training fold, whole patients, stratified by outcome; tested on the same full test folds.</p>
    </div>
  </div>
</section>
{% endif %}

{% if tuning %}
<section id="tuning">
  <h2>Nested cross-validation choices</h2>
  <div class="two">
  {% for t in tuning %}
    <div>
      <h3>{{ t.unit }}</h3>
      <p class="note">grid {{ t.grid }}; inner {{ t.inner_folds }}-fold grouped CV in each outer training fold</p>
      <table class="tuning-table" data-unit="{{ t.unit }}" style="width:auto">
        <thead><tr><th>outer split</th>{% for k in t["keys"] %}<th class="num">{{ k }}</th>{% endfor %}</tr></thead>
        <tbody>{% for r in t.rows %}<tr><td>{{ r.split }}</td>{% for v in r["values"] %}<td class="num">{{ v }}</td>{% endfor %}</tr>{% endfor %}</tbody>
      </table>
    </div>
  {% endfor %}
  </div>
</section>
{% endif %}

{% if saliency %}
<section id="saliency">
  <h2>Saliency examples (Grad-CAM)</h2>
  <p class="note">The most confident correct and wrong test images of each fold; y is the label, p the predicted probability.</p>
  {% for s in saliency %}
  <div class="sal-arm" data-unit="{{ s.unit }}">
    <h3>{{ s.unit }}</h3>
    <div class="sal-groups">
    {% for g in s.groups %}{% if g["items"] %}
    <div class="sal-group {{ 'ok' if g.correct else 'bad' }}"><h4>{{ g.label }}</h4>
      <div class="sal-row">{% for it in g["items"] %}
        <figure>{% if it.src %}<img class="saliency" alt="{{ it.alt }}" src="{{ it.src }}">{% else %}<div class="note">missing file {{ it.file }}</div>{% endif %}<figcaption>{{ it.where }}<br>{{ it.caption }}</figcaption></figure>
      {% endfor %}</div>
    </div>
    {% endif %}{% endfor %}
    </div>
  </div>
  {% endfor %}
</section>
{% endif %}

<section id="checklist">
  <h2>Reporting checklist (TRIPOD+AI, CLAIM)</h2>
  <h3>Stated by this run</h3>
  <ul class="check auto" id="checklist-auto">
  {% for c in checklist_auto %}<li><span class="mark">✓</span><span class="topic">{{ c.topic }}<span class="guide">{{ c.guide }}</span></span><ul>{% for l in c.lines %}<li>{{ l }}</li>{% endfor %}</ul></li>{% endfor %}
  </ul>
  <h3>For the authors to write</h3>
  <ul class="check user" id="checklist-user">
  {% for c in checklist_user %}<li><span class="mark">✎</span><span class="topic">{{ c.topic }}<span class="guide">{{ c.guide }}</span></span><span class="hint"><span class="write">to write</span>{{ c.hint }}</span></li>{% endfor %}
  </ul>
</section>

<section id="recipe">
  <h2>Recipe and versions</h2>
  <div class="two">
    <div><h3>recipe.yaml</h3><pre id="recipe-yaml">{{ recipe_text }}</pre></div>
    <div>
      <h3>environment.json</h3>
      <table id="environment-table" style="width:auto"><tbody>{% for k, v in environment %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</tbody></table>
      <h3>Training time</h3>
      <table style="width:auto"><thead><tr><th>unit</th><th class="num">seconds</th></tr></thead>
      <tbody>{% for n, s in train_seconds %}<tr><td>{{ n }}</td><td class="num">{{ s }}</td></tr>{% endfor %}
      <tr><td>wall time, last session</td><td class="num">{{ wall_seconds }}</td></tr></tbody></table>
    </div>
  </div>
</section>
<footer>Written by stagewise {{ version }} on {{ generated }} from metrics.json, recipe.yaml and environment.json in {{ run_dir }}. Every result shown is a value of metrics.json, rounded for display; nothing is recomputed (prevalences are ratios of its counts).</footer>
</main>
</body>
</html>
"""


def render(ctx: dict) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE).render(**ctx)


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` (one self-contained file) and return its path."""
    run_dir = Path(run_dir)
    text = render(build_context(run_dir))
    out = run_dir / REPORT_NAME
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
