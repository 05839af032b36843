"""A bundle of a deployed federated job's model: the coordinator's final global model.

A deployment (`stagewise federation coordinate`) ends with the final fit on every row of every
site and saves its global model in the run directory (`model/<arm>.safetensors`). This makes
a bundle of it through the same writer as `stagewise export` (`export.build_bundle`,
`write_model_files`, `write_info`), so `predict`, `evaluate` and `serve` use it like any other.

What the bundle may say is what the coordinator knows. It knows how the model was trained
(strategy, sites, rounds, each site's number of training images) and, when the job
cross-validated, each site's threshold-free AUROC over its own folds (of the fold models, not
of this one). It holds no out-of-fold scores (each site's scores stay at the site), so it
quotes no figure at a threshold and no calibration, and cannot choose a threshold: the
threshold is the one given at export or the recipe's fixed one, and the card says which.
"""

from __future__ import annotations

import json
from pathlib import Path

from stagewise.bundle.export import INTENSITY, build_bundle, bundle_header, write_info, write_model_files
from stagewise.bundle.model_card import INTENDED_USE
from stagewise.errors import RunError
from stagewise.federated.job_dir import JOB_FILE, JobDir
from stagewise.federated.job import FINAL
from stagewise.models import load_network
from stagewise.recipe import Recipe, strategy_text
from stagewise.text import counted


def finished_job(job_dir: Path) -> tuple[JobDir, dict, dict]:
    """(the job's run directory, its job.json, its final fit's record) of a coordinator's
    finished job; a RunError saying what to do for anything else."""
    folder = JobDir(job_dir)
    if not (folder.path / JOB_FILE).is_file():
        if (folder.path / "site.json").is_file():
            raise RunError(f"{job_dir} is a hospital's site folder (`stagewise federation site --workdir`); a bundle is "
                           "made from the coordinator's run directory (the -o folder of `stagewise federation "
                           "coordinate`), which holds the final global model")
        raise RunError(f"{job_dir} is not a coordinator's run directory (no {JOB_FILE}); give the -o folder of "
                       "`stagewise federation coordinate`")
    spec = folder.spec()
    if not spec.get("final"):
        raise RunError(f"{job_dir}: the job ran without its final fit (--no-final), so it has no model to deploy; run "
                       "the job with --final in a new run directory")
    status = json.loads((folder.fed / "status.json").read_text()) if (folder.fed / "status.json").is_file() else {}
    model = folder.path / "model" / f"{spec['arm']}.safetensors"
    if status.get("state") != "finished" or not folder.fit_file(FINAL).is_file() or not model.is_file():
        state = status.get("state", "not started")
        raise RunError(f"{job_dir}: the job has not finished (state: {state}"
                       + (f": {status['error']}" if status.get("error") else "")
                       + "), so its final global model is not saved yet; run the same `stagewise federation "
                         "coordinate ... -o` command again to continue it, and export when it has finished")
    return folder, spec, json.loads(folder.fit_file(FINAL).read_text())


def chosen_threshold(recipe: Recipe, threshold: float | None) -> tuple[float, str]:
    """The bundle's threshold and where it came from: `--threshold`, else the recipe's fixed one."""
    if threshold is not None:
        if not 0.0 < threshold < 1.0:
            raise RunError(f"--threshold {threshold}: give a probability between 0 and 1")
        return float(threshold), "given at export (--threshold); not chosen on data by stagewise"
    rule = recipe.protocol.threshold
    if rule.fixed:
        return float(rule.value), f"the recipe's fixed threshold (protocol.threshold: {rule.value})"
    raise RunError(f"the recipe chooses its threshold by the {rule.describe()} rule on out-of-fold scores, which stay at the "
                   "sites: the coordinator has none to choose one on. Give the threshold with --threshold (a "
                   "probability, e.g. one validated on local data)")


def training_facts(job_dir: JobDir, spec: dict, final: dict) -> dict:
    """How the final global model was trained, from the job's own records, in words too."""
    arm = job_dir.job().arm
    rounds = final["rounds"]
    images = {s: int(m["n_train_images"]) for s, m in final["sites"].items() if "n_train_images" in m}
    n_sites = int(spec["sites"])
    fewest = min((r["sites_replied"] for r in rounds), default=n_sites)
    stages = "; ".join(f"{st.kind} {st.rounds} round{'s' if st.rounds != 1 else ''} × {st.epochs} local "
                       f"epoch{'s' if st.epochs != 1 else ''} per round" for st in arm.stages if st.rounds)
    sites_text = ", ".join(f"{s}: {images[s]} images" if s in images else f"{s}: images not reported"
                           for s in final["sites"])
    description = (f"federated deployment: {strategy_text(arm.sites.model_dump())}; over {n_sites} sites "
                   f"({sites_text}), {counted(len(rounds), 'round')} ({stages}), on every image of each site; the model is the "
                   f"coordinator's final global model (job {spec['digest']})"
                   + (f"; some rounds completed with {fewest} of {n_sites} sites" if fewest < n_sites else ""))
    return {"mode": "federated", "deployment": True, "strategy": arm.sites.strategy,
            "strategy_params": dict(arm.sites.strategy_params), "bn_stats": arm.sites.bn_stats, "sites": n_sites,
            "images_per_site": images, "rounds": len(rounds),
            "sites_replied_per_round": [r["sites_replied"] for r in rounds], "job": spec["digest"],
            "description": description}


def cross_validation_facts(job_dir: Path) -> dict | None:
    """The job's own cross-validation (results.json), threshold-free figures only: each site's
    AUROC over its folds and the across-site AUROC; None when the job did not cross-validate."""
    results = json.loads((job_dir / "results.json").read_text())
    folds = [f for f in results.get("fits_finished", []) if f != FINAL]
    if not folds:
        return None
    return {"folds": len(folds),
            "sites": {s: {"auroc": m["auroc"], "n_test_patients": m.get("n_test_patients"), "folds": m.get("folds")}
                      for s, m in results.get("sites", {}).items()},
            "auroc_across_sites": results.get("auroc_across_sites"),
            "about": "each fold's federated training on the fold's training patients of every site, each site "
                     "scoring its own held-out patients with its final fold model: the arm's figures, not this "
                     "model's; AUROC only (threshold-free)"}


def export_federation_bundle(job_dir: str | Path, out: str | Path, threshold: float | None = None) -> Path:
    """A bundle of the final global model of the finished federated job in `job_dir` (the
    coordinator's run directory), with `threshold` or the recipe's fixed threshold."""
    job_dir, out = Path(job_dir), Path(out)
    folder, spec, final = finished_job(job_dir)
    job = folder.job()
    recipe, arm = job.recipe, job.arm
    if any(s.site_local for s in arm.stages):
        raise RunError(f"{job_dir}: arm {arm.name!r} ends with personalisation (site_local stages) at each site, so "
                       "the job's figures are of the sites' own models, not of the coordinator's global model; each "
                       "site's personalised model stays at the site")
    if arm.sites.local_groups:
        raise RunError(f"{job_dir}: arm {arm.name!r} keeps {', '.join(arm.sites.local_groups)} at each site "
                       "(sites.local_groups), so the coordinator's global model has never trained them and is no "
                       "model to deploy; each site's own model stays at the site")
    value, rule = chosen_threshold(recipe, threshold)
    net = load_network(folder.path / "model" / f"{arm.name}.safetensors")
    training = training_facts(folder, spec, final)
    cv = cross_validation_facts(folder.path)
    names = [recipe.cohort.outcome, *recipe.cohort.extra_outcomes]
    tasks = []
    for j, outcome in enumerate(names[: net.head.layers[-1].out_features]):
        tasks.append({
            "output": arm.name if j == 0 else f"{arm.name}:{outcome}", "arm": arm.name, "outcome": outcome,
            **recipe.cohort.wording(outcome), "stages": [st.kind for st in arm.stages],
            "n_folds": cv["folds"] if cv else 0, "training": training, "threshold": value,
            "metrics": {"auroc": cv["auroc_across_sites"]} if cv and j == 0 and cv.get("auroc_across_sites") else {},
            "federation": {"cross_validation": cv if j == 0 else None},
            "card": {"intended_use": INTENDED_USE, "calibration": None, "threshold_rule": rule,
                     "backbone_init": "random" if arm.backbone.name.startswith("scratch:") else "pretrained"},
        })
    info = {**bundle_header(recipe, arm.backbone.name), "tasks": tasks, "source": training["description"],
            "refit": False, "federation": {"job": spec["digest"], "sites": training["sites"],
                                           "rounds": training["rounds"], "strategy": arm.sites.strategy},
            "intensity": INTENSITY,
            "training_set_missing": "trained at the sites of a federated deployment, whose images never reached the "
                                    "coordinator that made this bundle"}

    def fill(tmp: Path) -> None:
        write_model_files(tmp, recipe, {arm.name: arm}, [arm.name], {arm.name: net}, net.backbone)
        write_info(tmp, info)

    return build_bundle(out, fill)
