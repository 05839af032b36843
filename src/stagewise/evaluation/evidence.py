"""From fold results to evidence: intervals, paired comparisons, calibration, utility.

Everything here works on *patient-level out-of-fold* results: each patient's image scores
are aggregated as the protocol says, and with several repeats each patient's score is the
mean over repeats (each repeat tests every patient once) and its decision the majority of
the per-fold decisions, which were made at thresholds chosen on training data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from stagewise.evaluation.calibration import (
    brier_score,
    calibration_curve,
    calibration_slope_intercept,
    curve_bands,
    decision_curve,
)
from stagewise.evaluation.conclusions import study_summary
from stagewise.evaluation.interpretation import ALPHA, interpret_comparisons, primary_choice, unit_flags
from stagewise.evaluation.metrics import COUNTS, METRICS, decision_metrics
from stagewise.evaluation.prior_shift import SAMPLED_PRIOR, sampling_of, shifted_predictions
from stagewise.evaluation.patient_level import patient_table
from stagewise.evaluation.recalibration import recalibrated
from stagewise.evaluation.statistics import (
    bootstrap_ci,
    bootstrap_many,
    corrected_resampled_ttest,
    delong_ci,
    delong_test,
    wilcoxon_test,
)
from stagewise.evaluation.subgroups import MIN_CLASS, subgroup_evidence
from stagewise.recipe import Recipe

FPR_GRID = np.linspace(0, 1, 51)
BAND_RESAMPLES = 500
"""At most this many patient resamples for a curve's band (ROC, smoothed calibration, net
benefit): a band is read by eye, and each resample redraws a whole curve."""
DECISION_THRESHOLDS = np.round(np.arange(0.02, 0.81, 0.02), 2)


def _roc_band(y: np.ndarray, s: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean ROC on a fixed FPR grid with a 95 % patient-bootstrap band."""
    def tpr_at_grid(yy, ss):
        fpr, tpr, _ = roc_curve(yy, ss)
        return np.interp(FPR_GRID, fpr, tpr)

    point = tpr_at_grid(y, s)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) == 2:
            draws.append(tpr_at_grid(y[idx], s[idx]))
    low, high = (np.quantile(draws, [0.025, 0.975], axis=0) if draws else (point, point))
    return {"fpr": FPR_GRID.round(4).tolist(), "tpr": point.round(4).tolist(),
            "tpr_low": np.round(low, 4).tolist(), "tpr_high": np.round(high, 4).tolist()}


def pooled_metrics(y: np.ndarray, score_decision: np.ndarray) -> dict[str, float]:
    """Every metric of pooled patients: AUROC and AUPRC of their scores (column 0), the
    decision metrics and counts of their majority decisions (column 1, positive at >= 0.5)."""
    s, pred = score_decision[:, 0], (score_decision[:, 1] >= 0.5).astype(int)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "auprc": float(average_precision_score(y, s)),
        **decision_metrics(y, pred),
    }


def unit_evidence(table: pd.DataFrame, kind: str, n_boot: int, seed: int) -> dict:
    y, s, d = table["y"].to_numpy(), table["score"].to_numpy(), table["decision"].to_numpy()
    patients = table["patient"].to_numpy()
    out = {"n_patients": int(len(y)), "n_positive": int(y.sum())}
    if len(np.unique(y)) < 2:
        return out
    auc, lo, hi = delong_ci(y, s)
    out["auroc_delong_ci"] = {"point": auc, "low": lo, "high": hi}
    pooled = pooled_metrics(y, np.column_stack([s, d]))
    out["confusion"] = {c: pooled[c] for c in COUNTS}
    if n_boot:
        out["bootstrap_ci"] = bootstrap_many(y, np.column_stack([s, d]), patients, pooled_metrics, METRICS,
                                             n_boot=n_boot, seed=seed)
    out["roc"] = _roc_band(y, s, min(n_boot, BAND_RESAMPLES), seed)
    if kind != "baseline":  # baseline scores are not probabilities: no calibration
        out |= calibration_evidence(y, s, min(n_boot, BAND_RESAMPLES), seed)
    return out


def calibration_evidence(y: np.ndarray, s: np.ndarray, n_boot: int = 0, seed: int = 0) -> dict:
    """Slope, intercept and Brier, the calibration curve (quantile bins, and the LOWESS smooth
    as `smooth`) and the decision curve of patient scores; with `n_boot`, patient-bootstrap
    95 % bands of the smooth (`smooth.low/high`) and of the model's net benefit
    (`net_benefit_model_low/high`), from `n_boot` resamples (`calibration.curve_bands`)."""
    dc = decision_curve(y, s, thresholds=DECISION_THRESHOLDS)
    bands = curve_bands(y, s, DECISION_THRESHOLDS, n_boot, seed)
    decision = {c: dc[c].round(5).tolist() for c in dc.columns}
    if "net_benefit" in bands:
        decision["net_benefit_model_low"] = bands["net_benefit"]["low"]
        decision["net_benefit_model_high"] = bands["net_benefit"]["high"]
        decision["band_resamples"] = bands["resamples"]
    curve = calibration_curve(y, s, n_bins=min(10, max(2, len(y) // 10))) | {"smooth": bands["smooth"]}
    if "resamples" in bands:
        curve["band_resamples"] = bands["resamples"]
    return {"calibration": calibration_slope_intercept(y, s) | {"brier": brier_score(y, s)},
            "calibration_curve": curve, "decision_curve": decision}


def sampling_evidence(recipe: Recipe, metrics: dict, predictions: pd.DataFrame) -> dict:
    """Per model unit trained with class-balanced sampling or CutMix / MixUp, or recalibrated
    in-study (`evaluation.recalibrate`): which stages sampled or mixed, and the calibration
    after each correction that applies, beside the raw one: `prior_shift` (balanced sampling
    in the final stage) and `recalibrated` (each fold's logistic recalibration)."""
    arms = {a.name: a for a in recipe.arms}
    cohort = metrics.get("cohort", {})
    cohort_prior = cohort.get("positive_images", 0) / cohort["images"] if cohort.get("images") else 0.5
    out = {}
    for name, u in metrics["arms"].items():
        arm = arms.get(u.get("base_arm")) if u["kind"] == "model" else None
        if arm is None:
            continue
        how = sampling_of(arm)
        fixed = _recalibrated_evidence(recipe, predictions[predictions["arm"] == name], name, u) if recalibrated(u) else None
        if fixed:
            how["recalibrated"] = fixed
        if not (how["balanced_sampling_stages"] or how["mixing_stages"] or fixed):
            continue
        out[name] = how
        if how["final_balanced"] and 0 < cohort_prior < 1:
            shifted, source = shifted_predictions(predictions[predictions["arm"] == name], u["folds"], cohort_prior)
            table = patient_table(shifted, {name: u}, recipe.protocol.patient_aggregate)
            y, s = table["y"].to_numpy(), table["score"].to_numpy()
            if len(np.unique(y)) == 2:
                out[name]["prior_shift"] = {"train_prevalence": source, "sampled_prior": SAMPLED_PRIOR,
                                            **calibration_evidence(y, s)}
    return out


def _recalibrated_evidence(recipe: Recipe, predictions: pd.DataFrame, name: str, unit: dict) -> dict | None:
    """Calibration, calibration curve and decision curve of a unit's patient scores after each
    fold's recalibration, with the fold fits and the pooled AUROC (raw and recalibrated: each
    fold's is unchanged, the pooled one can move a little as the folds' maps differ)."""
    how = recipe.protocol.patient_aggregate
    table = patient_table(predictions, {name: unit}, how, recalibrate=True)
    raw = patient_table(predictions, {name: unit}, how)
    y, s = table["y"].to_numpy(), table["score"].to_numpy()
    if len(np.unique(y)) < 2:
        return None
    fits = [{"repeat": f["repeat"], "fold": f["fold"], **f["recalibration"]} for f in unit["folds"]]
    return {"method": fits[0]["method"], "fitted_on": "each fold's training patients", "folds": fits,
            "pooled_auroc": float(roc_auc_score(y, s)), "pooled_auroc_raw": float(roc_auc_score(raw["y"], raw["score"])),
            **calibration_evidence(y, s)}


def site_evidence(table: pd.DataFrame, site_of: pd.Series, n_boot: int, seed: int) -> dict:
    """Per site: AUROC of the unit's patient scores on that site's patients, with DeLong and
    patient-bootstrap 95 % CIs (the forest plot of a multi-site study)."""
    out = {}
    sites = table["patient"].map(site_of)
    for site in dict.fromkeys(sites):
        part = table[sites == site]
        out[str(site)] = auroc_cis(part["y"].to_numpy(), part["score"].to_numpy(), part["patient"].to_numpy(),
                                   n_boot, seed)
    return out


def global_model_sites(predictions: pd.DataFrame, units: dict, name: str, how: str) -> pd.DataFrame | None:
    """The patient table of a federated unit's global model (`prob_global`: its final global
    model before personalisation, recorded under `sites.cross_site_evaluation`), for its
    per-site figures beside the personalised ones; None for a unit without it."""
    if "prob_global" not in predictions:
        return None
    rows = predictions[predictions["arm"] == name].dropna(subset=["prob_global"])
    if rows.empty:
        return None
    return patient_table(rows.assign(prob=rows["prob_global"]), {name: units[name]}, how)


def auroc_cis(y: np.ndarray, s: np.ndarray, patients: np.ndarray, n_boot: int, seed: int) -> dict:
    """Counts, and the AUROC with its DeLong and patient-bootstrap 95 % CIs (when both classes
    are present; the bootstrap only with n_boot > 0)."""
    out = {"n_patients": int(len(y)), "n_positive": int(y.sum())}
    if len(np.unique(y)) == 2:
        auc, lo, hi = delong_ci(y, s)
        out["auroc_delong_ci"] = {"point": auc, "low": lo, "high": hi}
        if n_boot:
            point, low, high = bootstrap_ci(y, s, patients, roc_auc_score, n_boot=n_boot, seed=seed)
            out["auroc_bootstrap_ci"] = {"point": point, "low": low, "high": high}
    return out


def default_comparisons(units: dict) -> list[tuple[str, str]]:
    """Every full-label model arm against the first, every model arm and the clinical model
    against every baseline, and the first model arm against the clinical model."""
    models = [n for n, u in units.items() if u["kind"] == "model" and u.get("label_fraction", 1.0) == 1.0]
    baselines = [n for n, u in units.items() if u["kind"] == "baseline"]
    clinical = [n for n, u in units.items() if u["kind"] == "clinical"]
    pairs = [(m, models[0]) for m in models[1:]]
    pairs += [(m, b) for m in models + clinical for b in baselines]
    pairs += [(models[0], c) for c in clinical if models]
    return pairs


def compare(units: dict, table: pd.DataFrame, a: str, b: str) -> dict:
    """DeLong on patients both units scored; corrected t and Wilcoxon on paired fold AUROCs."""
    ta, tb = table[table["arm"] == a], table[table["arm"] == b]
    both = ta.merge(tb, on="patient", suffixes=("_a", "_b"))
    out = {"a": a, "b": b, "n_patients": int(len(both))}
    if len(np.unique(both["y_a"])) == 2:
        out["delong"] = delong_test(both["y_a"].to_numpy(), both["score_a"].to_numpy(), both["score_b"].to_numpy())
    fa = {(f["repeat"], f["fold"]): f for f in units[a]["folds"]}
    fb = {(f["repeat"], f["fold"]): f for f in units[b]["folds"]}
    keys = sorted(set(fa) & set(fb))
    diffs = np.array([fa[k]["auroc"] - fb[k]["auroc"] for k in keys], dtype=float)
    out["n_fold_pairs"] = int((np.isfinite(diffs) & (diffs != 0)).sum())  # what the signed-rank test uses
    if np.isfinite(diffs).sum() >= 2:
        n_train = float(np.mean([fa[k]["n_train_patients"] for k in keys]))
        n_test = float(np.mean([fa[k]["n_test_patients"] for k in keys]))
        out["corrected_t"] = corrected_resampled_ttest(diffs, n_train, n_test)
        finite = np.isfinite(diffs)
        a_auc = np.array([fa[k]["auroc"] for k in keys])[finite]
        b_auc = np.array([fb[k]["auroc"] for k in keys])[finite]
        if np.any(a_auc != b_auc):
            out["wilcoxon"] = wilcoxon_test(a_auc, b_auc)
    return out


def label_efficiency(units: dict) -> dict:
    curves: dict[str, list] = {}
    for u in units.values():
        if u["kind"] == "model":
            s = u["summary"]["auroc"]
            curves.setdefault(u["base_arm"], []).append({"fraction": u["label_fraction"], "auroc_mean": s["mean"], "auroc_sd": s["sd"]})
    return {arm: sorted(c, key=lambda r: r["fraction"]) for arm, c in curves.items() if len(c) > 1}


def task_evidence(predictions: pd.DataFrame, unit: str, task: str, how: str, n_boot: int, seed: int) -> dict:
    """AUROC with DeLong and patient-bootstrap CIs for one extra outcome of a multi-task unit,
    on the patients whose label for it is known."""
    p = predictions[(predictions["arm"] == unit)].dropna(subset=[f"prob:{task}", f"y:{task}"])
    agg = {"mean": "mean", "max": "max", "first": "first"}[how]
    per_fold = p.groupby(["repeat", "fold", "patient"], sort=False).agg(y=(f"y:{task}", "first"), score=(f"prob:{task}", agg))
    table = per_fold.groupby("patient", sort=False).agg(y=("y", "first"), score=("score", "mean")).reset_index()
    out = auroc_cis(table["y"].to_numpy().astype(int), table["score"].to_numpy(), table["patient"].to_numpy(),
                    n_boot, seed)
    if "auroc_bootstrap_ci" in out:  # the key the report reads for units and tasks
        out["bootstrap_ci"] = {"auroc": out.pop("auroc_bootstrap_ci")}
    return out


def study_subgroups(recipe: Recipe, metrics: dict, predictions: pd.DataFrame, groups: pd.DataFrame | None) -> dict:
    """`subgroups.subgroup_evidence` of every full-label unit (image arms at all labels,
    baselines, the clinical model) over the cohort's subgroup columns; {} without any."""
    columns = (metrics.get("cohort", {}).get("characteristics") or {}).get("subgroups") or {}
    if groups is None or groups.empty or not columns:
        return {}
    units = metrics["arms"]
    names = [n for n, u in units.items() if u["kind"] != "model" or u.get("label_fraction", 1.0) == 1.0]
    n_boot = recipe.evaluation.bootstrap
    return {"min_class": MIN_CLASS, "resamples": n_boot, "columns": columns,
            "units": subgroup_evidence(predictions, groups, units, names, {c: v["levels"] for c, v in columns.items()},
                                       recipe.protocol.patient_aggregate, n_boot, recipe.seed)}


def compute_evidence(recipe: Recipe, metrics: dict, predictions: pd.DataFrame, groups: pd.DataFrame | None = None,
                     step=None) -> dict:
    """Everything metrics.json's `evidence` holds; `groups`, the cohort's subgroup levels by
    manifest row (`Cohort.groups`), adds the figures per subgroup level. `step(name, detail)`,
    if given, hears each part as it starts (the bootstrap of each unit can take a while)."""
    step = step or (lambda name, detail="": None)
    units = metrics["arms"]
    table = patient_table(predictions, units, recipe.protocol.patient_aggregate)
    n_boot = recipe.evaluation.bootstrap
    per_unit = {}
    for i, (name, u) in enumerate(units.items()):
        step(f"statistics of {name}", f"95 % CIs from {n_boot} patient resamples, calibration and decision curves "
             f"(unit {i + 1}/{len(units)})" if n_boot else f"calibration and decision curves (unit {i + 1}/{len(units)})")
        per_unit[name] = unit_evidence(table[table["arm"] == name], u["kind"], n_boot, recipe.seed)
    for name, u in units.items():
        if u.get("tasks"):
            per_unit[name]["tasks"] = {
                t: task_evidence(predictions, name, t, recipe.protocol.patient_aggregate, n_boot, recipe.seed) for t in u["tasks"]
            }
    if "site" in predictions:
        step("statistics per site")
        site_of = predictions.groupby("patient", sort=False)["site"].first()
        for name in units:
            per_unit[name]["sites"] = site_evidence(table[table["arm"] == name], site_of, n_boot, recipe.seed)
            if (glob := global_model_sites(predictions, units, name, recipe.protocol.patient_aggregate)) is not None:
                per_unit[name]["sites_global_model"] = site_evidence(glob, site_of, n_boot, recipe.seed)
    for e in per_unit.values():
        e["flags"] = unit_flags(e)
    pairs = list(recipe.evaluation.compare if recipe.evaluation.compare is not None else default_comparisons(units))
    primary = primary_choice(pairs, recipe.evaluation.primary)
    if primary and (primary["a"], primary["b"]) not in pairs:
        pairs.insert(0, (primary["a"], primary["b"]))
    step("comparisons", f"{len(pairs)} pair(s) of units, then sampling and subgroup figures")
    comparisons = [compare(units, table, a, b) for a, b in pairs]
    interpret_comparisons(comparisons, per_unit, primary)
    alpha = getattr(recipe.evaluation, "alpha", None) or ALPHA
    return {
        "summary": study_summary(comparisons, units, per_unit, primary, alpha),
        "summary_level": alpha,
        "patient_level": "mean score over repeats; decision = majority of fold decisions (confusion counts, "
                         "sensitivity, specificity, PPV, NPV, accuracy, balanced accuracy, F1)",
        "settings": {"bootstrap_resamples": n_boot, "roc_band_resamples": min(n_boot, BAND_RESAMPLES),
                     "curve_band_resamples": min(n_boot, BAND_RESAMPLES), "level": 0.95, "resampling": "patients"},
        "units": per_unit,
        "primary": primary,
        "multiplicity": "Holm, within each test, over every comparison's p except the primary test of the primary "
                        "comparison",
        "comparisons": comparisons,
        "sampling": sampling_evidence(recipe, metrics, predictions),
        "label_efficiency": label_efficiency(units),
        "subgroups": study_subgroups(recipe, metrics, predictions, groups),
    }

