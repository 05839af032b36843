"""A trained model outside the study: export bundles, predict on files.

A bundle is a folder a site can copy to a bedside machine: `backbone.safetensors` and
`heads.safetensors` (weights and the metadata to rebuild the network), `model.onnx`,
`bundle.json` (preprocessing, decision thresholds, metrics, provenance), the study's
`recipe.yaml` and a short `MODEL_CARD.md`. A bundle is meant to leave the site: it carries
no image file names and no local paths. It is built in a temporary folder beside its target
and moved into place at the end, so an interrupted export never leaves a mixed bundle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
import yaml

from stagewise.version import __version__
from stagewise.data.readers import INTENSITY_CONVENTION, INTENSITY_DESCRIPTION
from stagewise.bundle.model_card import card_facts, render_model_card
from stagewise.bundle.oof import threshold_figures, write_validation
from stagewise.bundle.training_set import record_training_set, training_set_summary, write_training_set
from stagewise.data import Cohort, load_cohort
from stagewise.data.fingerprint import cohort_digest
from stagewise.evaluation.metrics import choose_threshold
from stagewise.bundle.integrity import seal
from stagewise.bundle.network import SharedHeads, save_heads
from stagewise.models import Backbone, Network, load_network, save_backbone
from stagewise.recipe import Recipe, recipe_from_dict, recipe_to_dict, shareable_backbone, shareable_recipe
from stagewise.errors import RunError
from stagewise.io import check_writable
from stagewise.study.rundir import unit_fingerprint
from stagewise.study.tracking import log_bundle


@contextlib.contextmanager
def interrupt_after():
    """Ctrl-C (SIGINT) held while the block runs, then raised as KeyboardInterrupt. The ONNX
    exporter does not survive an interrupt inside it (the process aborted, leaving its
    temporary folder behind); held until the step ends, the interrupt unwinds through
    `build_bundle`, which removes the unfinished bundle. Outside the main thread (where no
    signal arrives) the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def export_onnx(model: torch.nn.Module, path: Path, image_size: int) -> Path:
    """`model` as ONNX in `path` (batch size free); Ctrl-C waits for the end of this step."""
    example = torch.rand(2, 1, *([image_size] * model.backbone.spatial_dims))
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    with interrupt_after():
        torch.onnx.export(
            model, (example,), str(path), input_names=["image"], output_names=["probability"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False,
        )
    return path


def fmt_threshold_rule(recipe: Recipe) -> str:
    """The protocol's threshold rule in words (`youden`, `sensitivity >= 0.9`, `fixed at 0.5`)."""
    return recipe.protocol.threshold.describe()


def refit_threshold(recipe: Recipe, patients: dict) -> tuple[float, str]:
    """A refit bundle's threshold: the protocol's rule applied to the arm's cross-validated
    out-of-fold patient scores (each patient scored by a fold model that did not train on it:
    the refit model itself has no patient left to choose on), and that in words."""
    rule = recipe.protocol.threshold
    value = choose_threshold(np.asarray(patients["label"], dtype=int), np.asarray(patients["score"], dtype=float), rule)
    if rule.fixed:
        return value, f"{rule.describe()} (protocol.threshold)"
    return value, (f"{rule.describe()}, chosen on the arm's cross-validated out-of-fold scores ({patients['n']} "
                   "patients, each scored by a fold model that did not train on it)")


def _fold_network(run_dir: Path, arm: str, fold: str) -> tuple[Network, float]:
    folder = run_dir / "folds" / arm
    meta_path, model_path = folder / f"{fold}.json", folder / f"{fold}.safetensors"
    if not meta_path.is_file():
        folds = sorted(p.stem for p in folder.glob("*.json"))
        raise RunError(f"arm {arm!r} has no fold {fold!r}; its folds are {', '.join(folds) or 'none (run the study)'}")
    if not model_path.is_file():
        raise RunError(f"fold {fold} of arm {arm!r} has no saved model: set `compute.save_models: true` and run the "
                       "arm again (in a new run directory), or export with --refit")
    threshold = json.loads(meta_path.read_text())["metrics"]["threshold"]
    return load_network(model_path), threshold


def _prepare_target(out: Path) -> None:
    """Refuse a target that exists and is not a bundle; fail early if it cannot be written."""
    if out.exists() and not (out / "bundle.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out} exists and is not a stagewise bundle; choose another --out folder")
    check_writable(out.parent)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished bundle in `tmp` (two renames; the old bundle is removed last)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_bundle(run_dir: str | Path, arms: str | list[str], out: str | Path, fold: str | None = None,
                  refit: bool = False) -> Path:
    """Bundle arms' models (a saved fold model, `fold` e.g. r0-f0, or a refit on every image).

    Several arms go into one bundle only when their trained backbones are bit-identical:
    the bundle then holds that backbone once and one head per arm."""
    run_dir, out = Path(run_dir), Path(out)
    arms = [arms] if isinstance(arms, str) else list(arms)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        if (run_dir / "job.json").is_file():
            raise RunError(f"{run_dir} is a federated deployment's run directory, not a study's: bundle its final "
                           "global model with `stagewise federation export`")
        raise RunError(f"{run_dir}: no metrics.json; finish the study first")
    metrics = json.loads(metrics_path.read_text())
    recipe = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text()), source=str(run_dir / "recipe.yaml"))
    configs = {a.name: a for a in recipe.arms}
    unknown = [a for a in arms if a not in configs]
    if unknown:
        raise RunError(f"{run_dir}: no model arm(s) {unknown}; arms: {sorted(configs)}")
    fused = [a for a in arms if configs[a].head.fusion]
    if fused:
        raise RunError(f"arms {fused} fuse clinical data; a bundle takes images only")
    if refit == (fold is not None):
        raise RunError("choose exactly one of --fold (a saved fold model) and --refit (train on every image)")
    from stagewise.study.site_arms import export_refusal

    refusals = [r for r in (export_refusal(configs[a], refit) for a in arms) if r]
    if refusals:
        raise RunError("; ".join(refusals))
    _prepare_target(out)
    nets, thresholds, training = {}, {}, {}
    for arm in arms:
        if refit:
            nets[arm], thresholds[arm], training[arm] = _refit(recipe, run_dir, arm, metrics["arms"][arm])
        else:
            nets[arm], thresholds[arm] = _fold_network(run_dir, arm, fold)
            training[arm] = {"mode": "pooled", "description": f"pooled: trained centrally on the training part of "
                                                              f"fold {fold}"}
    backbone = nets[arms[0]].backbone
    reference = backbone.state_dict()
    for arm in arms[1:]:
        other = nets[arm].backbone.state_dict()
        if other.keys() != reference.keys() or any(not torch.equal(other[k], reference[k]) for k in reference):
            raise RunError(f"arms {arms[0]!r} and {arm!r} do not share one backbone (only arms whose backbone stayed "
                           "frozen on the same weights do); export them as separate bundles")
    cohort = load_cohort(recipe.cohort)
    if fold is not None:
        _check_fold_cohort(run_dir, recipe, configs, arms, fold, cohort)
    trained_on = record_training_set(recipe, cohort, arms, fold)

    def fill(tmp: Path) -> None:
        write_training_set(tmp, trained_on)
        _write_bundle(tmp, recipe, metrics, configs, arms, nets, thresholds, training, backbone, refit, run_dir, fold,
                      training_set_summary(trained_on))

    build_bundle(out, fill)
    log_bundle(run_dir, out)  # into the study's MLflow run, when the run is tracked
    return out


def _check_fold_cohort(run_dir: Path, recipe: Recipe, configs: dict, arms: list[str], fold: str, cohort: Cohort) -> None:
    """A fold model's training images are the run's split of the cohort as it was when the fold
    trained: refuse when the cohort's rows or images changed since (the fold's fingerprint no
    longer matches), since the bundle could not say what it was trained on."""
    digest = cohort_digest(cohort.table, [c for c in cohort.table.columns if c != "path"])
    for arm in arms:
        meta = json.loads((run_dir / "folds" / arm / f"{fold}.json").read_text())
        if meta.get("fingerprint") != unit_fingerprint(recipe, "model", configs[arm], 1.0, None, digest):
            raise RunError(f"the cohort ({recipe.cohort.manifest}: its rows or image files) changed since fold {fold} of "
                           f"arm {arm!r} was trained, so the bundle could not record what it was trained on; run the "
                           "study again on the current cohort (or restore the cohort it ran on) and export then")


def build_bundle(out: Path, fill) -> Path:
    """Make the bundle `out`: `fill(folder)` writes its files into a fresh temporary folder
    beside it, which then replaces `out` whole (an interrupted export leaves no mixed bundle).
    Every bundle, whatever trained its model, is written through here, and sealed here: the
    digests of its files go into its bundle.json (`integrity.seal`)."""
    _prepare_target(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        fill(tmp)
        seal(tmp)  # the digests of every file, checked at each load
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_model_files(folder: Path, recipe: Recipe, configs: dict, arms: list[str], nets: dict,
                      backbone: Backbone) -> dict:
    """The network files of a bundle (weights, ONNX) and its shareable recipe; returns the heads."""
    save_backbone(backbone, folder / "backbone.safetensors")
    heads = {arm: nets[arm].head for arm in arms}
    save_heads(heads, {arm: configs[arm].head for arm in arms}, folder / "heads.safetensors")
    export_onnx(SharedHeads(backbone, heads), folder / "model.onnx", recipe.data.image_size)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(shareable_recipe(recipe_to_dict(recipe)), sort_keys=False))
    return heads


def write_info(folder: Path, info: dict) -> None:
    """bundle.json and the model card made from it; every file readable by other accounts."""
    (folder / "bundle.json").write_text(json.dumps(info, indent=2))
    (folder / "MODEL_CARD.md").write_text(render_model_card(info))
    for path in folder.iterdir():  # ordinary permissions: a bundle copied to another account must load
        os.chmod(path, 0o644)


def bundle_header(recipe: Recipe, backbone_name: str) -> dict:
    """What every bundle.json starts with: versions, the network's input and intensity convention."""
    return {"stagewise": __version__, "recipe": recipe.name, "backbone": shareable_backbone(backbone_name),
            "image_size": recipe.data.image_size, "resize": recipe.data.resize}


INTENSITY = {"convention": INTENSITY_CONVENTION, "description": INTENSITY_DESCRIPTION}


def _write_bundle(folder: Path, recipe: Recipe, metrics: dict, configs: dict, arms: list[str], nets: dict,
                  thresholds: dict, training: dict, backbone: Backbone, refit: bool, run_dir: Path,
                  fold: str | None, training_set: dict) -> None:
    heads = write_model_files(folder, recipe, configs, arms, nets, backbone)
    tasks = []
    for arm in arms:
        unit = metrics["arms"][arm]
        names = [recipe.cohort.outcome, *recipe.cohort.extra_outcomes]
        for j, outcome in enumerate(names[: heads[arm].layers[-1].out_features]):
            tasks.append({
                "output": arm if j == 0 else f"{arm}:{outcome}", "arm": arm, "outcome": outcome,
                **recipe.cohort.wording(outcome),  # outcome_label, outcome_horizon: how people read the outcome
                "stages": [st.kind for st in configs[arm].stages], "n_folds": len(unit["folds"]),
                "training": training[arm],
                "threshold": thresholds[arm] if j == 0 else _task_threshold(unit, outcome, refit, run_dir, arm, fold),
                "metrics": unit["summary"] if j == 0 else unit["tasks"][outcome],
                "card": card_facts(metrics, arm, configs[arm].backbone.name, fmt_threshold_rule(recipe), refit, fold)
                if j == 0 else {},
            })
    info = {
        **bundle_header(recipe, configs[arms[0]].backbone.name), "tasks": tasks,
        "source": ("every image of the cohort (refit after cross-validation): "
                   + "; ".join(dict.fromkeys(training[a]["description"] for a in arms))) if refit
        else f"the training part of fold {fold}",
        "refit": bool(refit), "intensity": INTENSITY,
        "training_set": training_set,  # training_set.json: what trained it, identifying no patient
    }
    validation = write_validation(folder, run_dir, metrics, tasks, recipe.protocol.patient_aggregate)
    for t in tasks:
        patients = (validation or {}).get(t["output"], {}).get("patients")
        if refit and patients:  # else (no predictions.csv) the median of the fold thresholds, as the card says
            t["threshold"], rule = refit_threshold(recipe, patients)
            if t["card"]:
                t["card"]["threshold_rule"] = rule
        if patients:
            t["at_threshold"] = threshold_figures(patients, t["threshold"], recipe.evaluation.bootstrap, recipe.seed)
    write_info(folder, info)


def _task_threshold(unit: dict, outcome: str, refit: bool, run_dir: Path, arm: str, fold: str | None) -> float:
    if refit:
        return float(np.median([f["tasks"][outcome]["threshold"] for f in unit["folds"]]))
    return json.loads((run_dir / "folds" / arm / f"{fold}.json").read_text())["metrics"]["tasks"][outcome]["threshold"]


def _refit(recipe: Recipe, run_dir: Path, arm: str, unit: dict) -> tuple[Network, float, dict]:
    """Train the arm on every image (pooled centrally, federated in Flower's simulation);
    the threshold returned is the median of its fold thresholds, used only where the run holds
    no out-of-fold scores to apply the rule to (`refit_threshold`). Returns also how the model
    was trained."""
    from stagewise.study.fitting import refit_arm

    net, training = refit_arm(recipe, arm, run_dir)
    return net, float(np.median([f["threshold"] for f in unit["folds"]])), training
