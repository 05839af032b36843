"""A unit's summary over its folds, as metrics.json holds it: metric means and sds, per
extra outcome and per site, resources per stage, tuning choices, and how local/federated arms
trained across sites."""

from __future__ import annotations

import numpy as np

from stagewise.evaluation.metrics import summarize
from stagewise.recipe import shareable_backbone
from stagewise.study.cross_site import mean_matrix
from stagewise.study.units import Unit
from stagewise.training.privacy_budget import privacy_over_folds


def _task_summaries(fold_results: list[dict]) -> dict:
    tasks = fold_results[0]["metrics"].get("tasks", {})
    if not tasks:
        return {}
    return {"tasks": {t: summarize([m["metrics"]["tasks"][t] for m in fold_results]) for t in tasks}}


def _resources(fold_results: list[dict]) -> dict:
    """Per stage kind: median seconds per fold, and peak memory over folds."""
    by_stage: dict[str, dict] = {}
    for m in fold_results:
        for i, st in enumerate(m.get("stages", [])):
            key = f"{i}:{st['kind']}"
            rec = by_stage.setdefault(key, {"seconds": [], "memory": {}})
            rec["seconds"].append(st["seconds"])
            for name, value in st.get("memory", {}).items():
                rec["memory"][name] = max(rec["memory"].get(name, 0), value)
    return {k: {"median_seconds_per_fold": float(np.median(v["seconds"])), **v["memory"]} for k, v in by_stage.items()}


def _sites_training(fold_results: list[dict]) -> dict:
    """Local/federated arms: communication per fold and cross-site AUROC (mean over folds)."""
    infos = [m["sites_training"] for m in fold_results if "sites_training" in m]
    out: dict = {"mode": infos[0]["mode"]}
    if infos[0]["mode"] == "federated":
        out |= {k: infos[0][k] for k in ("strategy", "bn_stats", "local_groups") if k in infos[0]}
        if "personalised" in infos[0]:
            held_out = sorted({s for i in infos for s in i["personalised"]["scored_by_global_model"]})
            out["personalised"] = {"stages": infos[0]["personalised"]["stages"], "scored_by_global_model": held_out,
                                   "notes": sorted({i["personalised"]["note"] for i in infos if "note" in i["personalised"]})}
        out["bytes_per_fold"] = float(np.mean([i["bytes_total"] for i in infos]))
        out["bytes_full_model_fedavg_per_fold"] = float(np.mean([i["bytes_full_model_fedavg"] for i in infos]))
        out["rounds"] = [{k: r[k] for k in ("round", "stage", "round_in_stage", "trainable", "bytes_down_per_site",
                                            "bytes_up", "sites_replied", "sites", "failures") if k in r}
                         for r in infos[0]["rounds"]]
        out["round_loss"] = round_losses([(m["repeat"], m["fold"], m["sites_training"]["rounds"])
                                          for m in fold_results if "sites_training" in m])
        out["rounds_with_missing_sites"] = sum(1 for i in infos for r in i["rounds"] if r["sites_replied"] < r["sites"])
        if any("privacy" in i for i in infos):
            out["privacy"] = privacy_over_folds([i["privacy"] for i in infos if "privacy" in i])
        if any("cross_site" in i for i in infos):
            out["cross_site"] = _federated_cross_site([i["cross_site"] for i in infos if "cross_site" in i])
        if secure := [i["secure_aggregation"] for i in infos if "secure_aggregation" in i]:  # over the folds
            bounds = [b for x in secure if (b := x["largest_error_bound"]) is not None]
            out["secure_aggregation"] = secure[0] | {"rounds_aggregated_securely": sum(
                x["rounds_aggregated_securely"] for x in secure), "largest_error_bound": max(bounds, default=None)}
    else:
        out["cross_site_auroc"] = mean_matrix([i["cross_site_auroc"] for i in infos])
    return out


def _federated_cross_site(folds: list[dict]) -> dict:
    """A federated arm's cross-site evaluation over folds: the matrix (mean AUROC over folds),
    the global model's AUROC per site where the arm has one, and what the site models cost on
    the wire; `site_models_left_sites` says the site models left their sites to be scored."""
    out = {"auroc": mean_matrix([f["auroc"] for f in folds]), "site_models_left_sites": True, "folds": len(folds),
           "site_model_bytes": {s: max(f["site_model_bytes"].get(s, 0) for f in folds)
                                for s in dict.fromkeys(s for f in folds for s in f["site_model_bytes"])},
           "bytes_down_per_fold": float(np.mean([f["bytes_down_total"] for f in folds]))}
    if any("global_auroc" in f for f in folds):
        out["global_auroc"] = mean_matrix([{"global model": f["global_auroc"]} for f in folds if "global_auroc" in f])[
            "global model"]
    return out


def round_losses(folds: list[tuple[int, int, list[dict]]]) -> list[dict]:
    """A federated arm's training loss per round, as the report's table and figure show it:
    per round each site's loss and the round's weighted mean (`loss`, weighted by the sites'
    training examples), each the mean over the folds that recorded it, and each fold's own
    weighted mean (`per_fold`: a fold whose loss went another way stays visible). `folds`:
    (repeat, fold, the fold's round records)."""
    by_round: dict[int, dict] = {}
    for repeat, fold, rounds in folds:
        for r in rounds:
            row = by_round.setdefault(r["round"], {"round": r["round"], "stage": r["stage"],
                                                   "round_in_stage": r.get("round_in_stage"),
                                                   "trainable": r["trainable"], "sites": {}, "loss": [], "per_fold": {}})
            for site, loss in (r.get("site_loss") or {}).items():
                if loss is not None:  # a site's undefined loss (NaN) is null in the fold's json
                    row["sites"].setdefault(site, []).append(loss)
            if r.get("loss") is not None:
                row["loss"].append(r["loss"])
                row["per_fold"][f"r{repeat}-f{fold}"] = r["loss"]
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    return [row | {"sites": {s: mean(v) for s, v in row["sites"].items()}, "loss": mean(row["loss"]),
                   "folds": len(row["loss"])} for _, row in sorted(by_round.items())]


def _training_curves(fold_results: list[dict]) -> list[dict]:
    """Per fold and stage the training loss of each epoch (the report's training-curve figure:
    a loss that never falls, or falls in one fold only, is visible before any metric is read)."""
    return [{"repeat": m["repeat"], "fold": m["fold"],
             "stages": [{"kind": st["kind"], "loss": [float(e["loss"]) for e in st.get("epochs", []) if "loss" in e]}
                        for st in m.get("stages", [])]}
            for m in fold_results]


def compute_setting(label: str, threads: int | None) -> str:
    """One fold's compute in words: its device, precision, layout and torch threads."""
    if not threads:
        return f"{label}, threads not recorded"
    return f"{label}, {threads} thread{'s' if threads != 1 else ''}"


def compute_settings(fold_results: list[dict]) -> list[dict]:
    """The distinct compute settings a unit's folds ran with (each fold's json records its
    own: a resumed run may have run some folds under other settings), with how many folds each,
    in the order first met."""
    counts: dict[tuple, int] = {}
    for m in fold_results:
        key = (m.get("compute"), m.get("threads"))
        if key[0] is not None:
            counts[key] = counts.get(key, 0) + 1
    return [{"setting": compute_setting(label, threads), "compute": label, "threads": threads, "folds": n}
            for (label, threads), n in counts.items()]


def settings_text(settings: list[dict]) -> str:
    """Compute settings with their fold counts, in words: 'cpu fp32, 2 threads (3 folds); ...'."""
    return "; ".join(f"{s['setting']} ({s['folds']} fold{'s' if s['folds'] != 1 else ''})" for s in settings)


def run_compute(units: dict, session_label: str) -> tuple[str, list[dict]]:
    """What the run's folds ran with, over every model unit: (the run's compute label, the
    distinct settings with fold counts). The label is this session's when every fold ran with
    its device, precision and layout, the one all folds share when they share one, else
    'mixed: ' and every setting with its folds, so the run never claims a single setting for
    folds that ran under another."""
    counts: dict[tuple, dict] = {}
    for u in units.values():
        for s in u.get("compute") or []:
            key = (s["compute"], s["threads"])
            counts.setdefault(key, s | {"folds": 0})["folds"] += s["folds"]
    settings = list(counts.values())
    labels = {s["compute"] for s in settings}
    if len(labels) > 1:
        return "mixed: " + settings_text(settings), settings
    return (next(iter(labels)) if labels else session_label), settings


def mixed_units(units: dict) -> dict[str, str]:
    """Units whose folds ran under more than one compute setting, with those settings in words."""
    return {name: settings_text(u["compute"]) for name, u in units.items() if len(u.get("compute") or []) > 1}


def unit_summary(unit: Unit, fold_results: list[dict]) -> dict:
    out = {
        "kind": unit.kind,
        "summary": summarize([m["metrics"] for m in fold_results]),
        **_task_summaries(fold_results),
        "folds": [{"repeat": m["repeat"], "fold": m["fold"], **m["metrics"]} for m in fold_results],
        "train_seconds": sum(m["seconds"] for m in fold_results),
    }
    site_folds = [m["metrics"]["sites"] for m in fold_results if "sites" in m["metrics"]]
    if site_folds:
        names = list(dict.fromkeys(s for folds in site_folds for s in folds))
        out["sites"] = {s: summarize([f[s] for f in site_folds if s in f]) for s in names}
    if unit.kind == "model":
        out |= {"backbone": shareable_backbone(unit.arm.backbone.name),  # metrics.json leaves the site
                "stages": [s.kind for s in unit.arm.stages],
                "label_fraction": unit.fraction, "base_arm": unit.arm.name, "training": unit.arm.sites.mode}
        if unit.arm.sites.mode != "pooled":
            out["sites_training"] = _sites_training(fold_results)
        out["resources"] = _resources(fold_results)
        out["compute"] = compute_settings(fold_results)
        out["training_curves"] = _training_curves(fold_results)
        if unit.arm.tune is not None:
            out["tuning"] = [{"repeat": m["repeat"], "fold": m["fold"], "chosen": m["tuning"]["chosen"]} for m in fold_results]
        out["saliency"] = [s for m in fold_results for s in m.get("saliency", [])]
    elif unit.kind == "baseline":
        out |= {"backbone": f"score column {unit.column}", "stages": ["baseline"], "column": unit.column,
                # per fold: +1 where higher values meant the outcome on its training part, -1 where lower did
                "directions": [m.get("direction") for m in fold_results]}
    else:
        out |= {"backbone": "logistic regression on clinical columns", "stages": ["clinical"]}
    return out
