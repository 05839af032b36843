"""The report's reading of the comparisons: which test is primary, which comparators failed.

evaluation/interpretation.py decides (in metrics.json) the primary comparison and test, the
Holm-adjusted p-values, whether a Wilcoxon test can reach p < 0.05 with the folds it has, and
which units rank patients the wrong way round. This module puts those values into words and
table cells; only the primary test of the primary comparison is coloured, because it alone
was named before the results (the others are read through their adjusted p).
"""

from __future__ import annotations

from stagewise.recipe import outcome_phrase
from stagewise.report.formatting import DASH, finite, fmt_ci, fmt_num, fmt_p

TEST_NAMES = {"corrected_t": "corrected resampled t-test on fold AUROCs", "delong": "DeLong test on pooled patients",
              "wilcoxon": "Wilcoxon signed-rank test on fold AUROCs"}
FLAG_MEANING = ("its out-of-fold scores rank patients the wrong way round: what it learned on the training folds "
                "reverses on the test folds (a relation unstable across folds, or no signal and overfitting). "
                "A comparison against it shows only that this comparator failed, not that the other unit works.")


def outcome_text(recipe: dict) -> str:
    """The study's primary outcome as the report names it: the recipe's `cohort.outcome_label`
    and `outcome_horizon` with the column ('admission to intensive care within 30 days of the
    radiograph (column went_icu)'), the column alone when they are unset."""
    cohort = recipe.get("cohort") or {}
    column = str(cohort.get("outcome") or "outcome")
    return outcome_phrase(column, cohort.get("outcome_label"), cohort.get("outcome_horizon"), name_column=True)


def flag_text(flag: dict) -> str:
    """One flag of evaluation.interpretation.unit_flags in words, with its numbers."""
    if flag.get("code") == "auroc_below_chance":
        return (f"AUROC {fmt_num(flag.get('point'))}, 95 % CI {fmt_ci(flag.get('low'), flag.get('high'))} "
                "lies below 0.5 (worse than chance)")
    if flag.get("code") == "negative_calibration_slope":
        return f"calibration slope {fmt_num(flag.get('slope'), 2)} is negative"
    return str(flag.get("code", DASH))


def unit_flag_notes(units_evidence: dict, order: list[str]) -> list[dict]:
    """Every flagged unit: {unit, reasons, meaning}."""
    return [{"unit": n, "reasons": "; ".join(flag_text(f) for f in units_evidence[n]["flags"]), "meaning": FLAG_MEANING}
            for n in order if (units_evidence.get(n) or {}).get("flags")]


def _p_cell(result: dict, coloured: bool) -> dict:
    """A p-value cell: the raw p, the Holm-adjusted p beside it (absent for the primary test)."""
    p, holm = result.get("p"), result.get("p_holm")
    return {"p": fmt_p(p), "holm": fmt_p(holm) if finite(holm) else "",
            "sig": coloured and finite(p) and p < 0.05}


def comparison_rows(comparisons: list[dict], primary: dict | None) -> list[dict]:
    """The comparisons table: per row the DeLong, corrected t and Wilcoxon cells, the primary
    mark and the flagged comparators."""
    rows = []
    for c in comparisons:
        d, t, w = c.get("delong") or {}, c.get("corrected_t") or {}, c.get("wilcoxon") or {}
        main = primary["test"] if c.get("primary") and primary else None
        reach = c.get("wilcoxon_can_reach", True)
        if not w:
            w_note = "not computed: identical fold AUROCs or too few folds"
        elif not reach:
            w_note = (f"not shown: with {c.get('n_fold_pairs')} paired folds the smallest p this test can give is "
                      f"{fmt_p(c.get('wilcoxon_smallest_p'))}, so it can never reach p < 0.05")
        else:
            w_note = ""
        rows.append({
            "a": c.get("a"), "b": c.get("b"), "n": c.get("n_patients", DASH), "primary": bool(c.get("primary")),
            "delong_diff": fmt_num(d.get("diff")), "delong_ci": fmt_ci(d.get("ci_low"), d.get("ci_high")),
            "delong": _p_cell(d, main == "delong"),
            "t_diff": fmt_num(t.get("mean_diff")), "t_ci": fmt_ci(t.get("ci_low"), t.get("ci_high")),
            "t": _p_cell(t, main == "corrected_t"), "t_df": t.get("df", DASH),
            "w": _p_cell(w, main == "wilcoxon") if w and reach else {"p": DASH, "holm": "", "sig": False},
            "w_note": w_note,
            "flags": [{"unit": u, "text": "; ".join(flag_text(f) for f in fl)} for u, fl in (c.get("flagged") or {}).items()],
        })
    return rows


def compute_text(settings: list[dict] | None) -> str:
    """Compute settings of metrics.json (`compute_folds`, `arms[unit].compute`) with their fold counts."""
    return "; ".join(f"{s.get('setting', DASH)} ({s.get('folds', DASH)} fold{'' if s.get('folds') == 1 else 's'})"
                     for s in settings or [])


def header_compute(metrics: dict) -> str:
    """The run's compute for the header: the one setting every fold ran with, else each with its folds."""
    settings = metrics.get("compute_folds") or []
    if len(settings) == 1:
        return settings[0].get("setting", DASH)
    if settings:
        return "mixed: " + compute_text(settings)
    return metrics.get("compute", DASH)


def mixed_compute_notes(arms: dict, order: list[str]) -> list[str]:
    """One line per unit whose folds ran under different compute settings (a resumed run)."""
    return [f"{n}: its folds ran under different compute settings ({compute_text(arms[n]['compute'])}), "
            "so its training time mixes them and is not comparable with the other units'."
            for n in order if len(arms[n].get("compute") or []) > 1]


CONCLUSIONS_TITLE = "What this study shows"


def conclusions(evidence: dict) -> dict:
    """The box at the top of the report: the sentences of evidence.summary as metrics.json
    holds them (generated in evaluation/conclusions.py), and how to read them."""
    sentences = list(evidence.get("summary") or [])
    level = evidence.get("summary_level", 0.05)
    note = (f"Generated from the comparisons below (metrics.json: evidence.summary). A unit \u201cbeats\u201d another only "
            f"where the p that applies is below {fmt_num(level, 2)}: the primary test's own p for the primary comparison, "
            "the Holm-adjusted p for every other; above it the difference may be chance.") if sentences else ""
    return {"title": CONCLUSIONS_TITLE, "sentences": sentences, "note": note}


def primary_text(primary: dict | None) -> str:
    """The sentence that names the primary comparison and test, and where it was stated."""
    if not primary:
        return ""
    where = "as the recipe states (evaluation.primary)" if primary.get("stated") else \
        "by default: the first comparison (set evaluation.primary in the recipe to state another)"
    return (f"Primary comparison: {primary['a']} vs {primary['b']}, {TEST_NAMES.get(primary['test'], primary['test'])}, "
            f"{where}. Only its p is coloured (green when < 0.05).")


def sampling_notes(sampling: dict, order: list[str]) -> list[dict]:
    """Per unit trained with class-balanced sampling or CutMix / MixUp, or recalibrated in-study:
    what that does to its predicted risks, and which correction the report shows beside the raw curves."""
    notes = []
    for name in order:
        how = sampling.get(name)
        if not how:
            continue
        parts = []
        if how.get("balanced_sampling_stages"):
            parts.append(f"class-balanced sampling (stage {', '.join(map(str, how['balanced_sampling_stages']))}) "
                         "trains at a prevalence of 0.5, so predicted risks are shifted towards it")
        if how.get("mixing_stages"):
            parts.append(f"mixing (stage {', '.join(how['mixing_stages'])}) trains on soft labels, which pulls "
                         "predictions towards the middle")
        if not parts:
            parts.append("its predicted risks were recalibrated in-study, as the recipe asks (evaluation.recalibrate)")
        fixes = []
        ps, rc = how.get("prior_shift"), how.get("recalibrated")
        if ps:
            source = ("each fold's training prevalence" if ps.get("train_prevalence") == "fold"
                      else "the cohort's image prevalence (these folds did not record their own)")
            fixes.append(f"prior-shift corrected (logit p + logit(π) − logit({fmt_num(ps.get('sampled_prior'), 1)}), π = "
                         f"{source}) beside the raw curves below; AUROC and decisions are unchanged by it")
        elif how.get("balanced_sampling_stages"):
            fixes.append("no prior-shift correction: the final stage did not sample classes evenly")
        if rc:
            what = "intercept only" if rc.get("method") == "intercept" else "intercept and slope"
            fixes.append(f"logistic recalibration (p′ = sigmoid(a + b logit p), {what}), fitted on each fold's training "
                         "patients and applied to its test patients, beside the raw curves below; each fold's AUROC "
                         f"and decisions are unchanged by it (pooled AUROC {fmt_num(rc.get('pooled_auroc_raw'))} raw, "
                         f"{fmt_num(rc.get('pooled_auroc'))} recalibrated, as the folds' maps differ); fitted on patients "
                         "the network trained on, it does not correct over-fitting")
        elif how.get("mixing_stages"):
            fixes.append("no closed-form correction exists for mixing: recalibrate on held-out patients "
                         "(stagewise evaluate --recalibrate), or in-study per fold (evaluation.recalibrate), "
                         "before reading these risks")
        notes.append({"unit": name, "text": "; ".join(parts), "fix": "; ".join(fixes)})
    return notes


_CORRECTIONS = (("prior_shift", "prior-shift", "prior-shift corrected"), ("recalibrated", "recalibrated", "recalibrated in-study"))
"""evidence.sampling key, the table row's data-corrected value, and the words after the unit's name."""


def corrected_calibration_rows(sampling: dict, order: list[str]) -> list[dict]:
    """Calibration of the corrected scores (prior shift, in-study recalibration), in the calibration table's cells."""
    rows = []
    for key, kind, words in _CORRECTIONS:
        for name in order:
            cal = ((sampling.get(name) or {}).get(key) or {}).get("calibration")
            if cal:
                rows.append({"name": f"{name} ({words})", "unit": name, "kind": kind,
                             "slope": fmt_num(cal.get("slope"), 2), "slope_ci": fmt_ci(cal.get("slope_low"), cal.get("slope_high"), 2),
                             "intercept": fmt_num(cal.get("intercept"), 2),
                             "intercept_ci": fmt_ci(cal.get("intercept_low"), cal.get("intercept_high"), 2),
                             "brier": fmt_num(cal.get("brier"))})
    return rows
