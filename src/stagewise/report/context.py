"""What the report shows, read from the run directory and put into the template's context.

`build_context(run_dir)` reads what the run wrote (metrics.json, recipe.yaml, environment.json,
log.txt and the saliency PNGs under folds/) and turns it into the formatted strings, table rows and
embedded figures that templates/report.html.j2 lays out. Nothing is recomputed: every number is a
value of metrics.json formatted by formatting.py (the only derived numbers are the cohort
prevalences, a ratio of two counts in metrics.json); the curves are drawn by figures.py and the
TRIPOD+AI / CLAIM items are written by checklist.py. Keeping all reading and formatting out of
the template leaves it with layout only, and lets the context be checked without rendering any HTML.

The work is split by job: `run_files` reads the run's files, `sections` turns each table, figure set
and panel into template rows, and `build_context` here calls them in page order.
"""

from __future__ import annotations

from pathlib import Path

from stagewise.report.thresholds import threshold_notes
from stagewise.report.checklist import checklist
from stagewise.report.cross_site import cross_site_panel, local_matrices
from stagewise.report.federated import federated_sections, nav_with_federated
from stagewise.report.figures import palette, saliency_colorbar
from stagewise.report.formatting import DASH
from stagewise.report.participants import participants_section, subgroup_table, with_tripod_nav
from stagewise.report.run_files import read_run
from stagewise.report.sections import (
    calibration_rows,
    clinical_row,
    figure_set,
    fold_table,
    label_efficiency_rows,
    nav_items,
    pooled_rows,
    resource_rows,
    run_footer,
    run_header,
    saliency_sections,
    site_training_rows,
    task_rows,
    training_curve_rows,
    tuning_rows,
    unit_rows,
)
from stagewise.report.unit_order import ordered_units, recipe_arms
from stagewise.report.wording import (
    comparison_rows,
    conclusions,
    corrected_calibration_rows,
    outcome_text,
    primary_text,
    sampling_notes,
    unit_flag_notes,
)


def build_context(run_dir: str | Path) -> dict:
    """Everything the report shows, as formatted strings and embedded figures.

    Each section comes from one function of `sections`; this only fixes the order they run in
    (tables, then figures, then the header and footer entries, then the checklist, which repeats
    some of their texts) and the order of the context's keys."""
    run_dir = Path(run_dir)
    metrics, env, recipe, recipe_text = read_run(run_dir)

    arms: dict = metrics.get("arms", {})
    evidence: dict = metrics.get("evidence", {})
    ev: dict = evidence.get("units", {})
    cohort: dict = metrics.get("cohort", {})
    protocol: dict = metrics.get("protocol", {})
    n_splits = metrics.get("n_splits", DASH)
    order = ordered_units(arms)
    colors = palette(order)

    units = unit_rows(arms, ev, order, n_splits, colors)
    tasks = task_rows(arms, ev, order)
    resources = resource_rows(arms, order)
    pooled = pooled_rows(ev, order)
    clinical = [clinical_row(name, arms[name].get("summary", {}), ev.get(name, {})) for name in order]
    comparisons = comparison_rows(evidence.get("comparisons", []), evidence.get("primary"))
    calibration = calibration_rows(ev, order)
    curves = evidence.get("label_efficiency") or {}
    label_rows = label_efficiency_rows(curves)
    tuning = tuning_rows(arms, order, recipe_arms(recipe))
    saliency = saliency_sections(run_dir, arms, order)
    training_curves = training_curve_rows(arms, order, colors)
    fold_rows = fold_table(arms, order)
    sampling = evidence.get("sampling") or {}
    figures = figure_set(arms, ev, order, colors, curves, sampling)

    ctx = run_header(run_dir, metrics, env, cohort, protocol, n_splits) | {
        "outcome": outcome_text(recipe) if recipe else None,
        "conclusions": conclusions(evidence),
        "patient_level": evidence.get("patient_level", ""),
        "units": units,
        "pooled": pooled,
        "clinical": clinical if any(r["cells"][0]["folds"] != DASH for r in clinical) else [],
        "task_rows": tasks,
        "resource_rows": resources,
        "comparisons": comparisons,
        "primary_text": primary_text(evidence.get("primary")),
        "multiplicity": evidence.get("multiplicity", ""),
        "flag_notes": unit_flag_notes(ev, order),
        "calibration": calibration,
        "calibration_corrected": corrected_calibration_rows(sampling, order),
        "sampling_notes": sampling_notes(sampling, order),
        "label_rows": label_rows,
        "site_training": site_training_rows(arms, order),
        "local_matrices": local_matrices(arms, order),
        "federated": federated_sections(arms, order, recipe_arms(recipe), colors,
                                        {n: cross_site_panel(n, arms, order, ev) for n in order}),
        "tuning": tuning,
        "saliency": saliency,
        "saliency_colorbar": saliency_colorbar() if saliency else None,
        "training_curves": training_curves,
        "fold_units": order,
        "fold_rows": fold_rows,
        "figures": figures,
        "participants": participants_section(cohort, ev, order),
        "subgroups": subgroup_table(evidence.get("subgroups") or {}, order),
        "thresholds": threshold_notes(arms, order, protocol),
    } | run_footer(metrics, env, arms, order, recipe_text)
    ctx["checklist_auto"], ctx["checklist_user"] = checklist(metrics, recipe, ctx)
    ctx["nav"] = nav_items(comparisons, figures, pooled, tuning, training_curves, saliency,
                           bool(ctx["conclusions"]["sentences"]))
    ctx["nav"] = nav_with_federated(ctx["nav"], ctx["federated"])
    ctx["nav"] = with_tripod_nav(ctx["nav"], ctx)
    return ctx
