"""Run a study: recipe -> cohort -> splits -> (per arm and fold: backbone -> stages ->
predictions) -> metrics. Every arm runs on exactly the same folds."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from stagewise.data import Cohort, load_cohort, load_images
from stagewise.evaluation.metrics import binary_metrics, choose_threshold, patient_scores, summarize
from stagewise.evaluation.splits import Split, make_splits
from stagewise.models import Network, create_backbone, save_backbone
from stagewise.recipe import ArmConfig, Recipe
from stagewise.runs import RunDir, arm_fingerprint
from stagewise.training.cache import ImageSet, PrefixCache
from stagewise.training.compute import Compute, resolve_compute
from stagewise.training.engine import fit_stage, predict, prepare_network

log = logging.getLogger("stagewise")


class Reporter(Protocol):
    """What a progress display receives; the CLI's rich display implements it."""

    def start(self, total_folds: int) -> None: ...
    def fold_started(self, arm: str, split: Split, n_epochs: int) -> None: ...
    def epoch_done(self, stage: str, epoch: int, entry: dict) -> None: ...
    def fold_done(self, arm: str, split: Split, metrics: dict, resumed: bool) -> None: ...


class _Silent:
    def start(self, total_folds):
        pass

    def fold_started(self, arm, split, n_epochs):
        pass

    def epoch_done(self, stage, epoch, entry):
        pass

    def fold_done(self, arm, split, metrics, resumed):
        pass


@dataclass
class StudyResult:
    run_dir: Path
    metrics: dict
    predictions: pd.DataFrame


def fold_seed(seed: int, split: Split) -> int:
    """Seed of one fold, shared by all arms (paired design) and independent of run order."""
    digest = hashlib.blake2b(f"{seed}:{split.repeat}:{split.fold}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _image_key(cohort: Cohort, size: int, resize: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in cohort.table["path"]:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(f"{size}|{resize}".encode())
    return h.hexdigest()


def load_image_set(recipe: Recipe, cohort: Cohort) -> ImageSet:
    t = cohort.table
    x = load_images(t["path"].tolist(), recipe.data.image_size, recipe.data.resize, rows=t["row"].tolist())
    return ImageSet(x, _image_key(cohort, recipe.data.image_size, recipe.data.resize))


def _seeded_backbone(arm: ArmConfig, seed: int) -> torch.nn.Module:
    """The arm's starting backbone; random (scratch) weights depend on the recipe seed only,
    not on how much training ran before in this process, so a resumed run matches."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_backbone(arm.backbone)


def train_fold(
    arm: ArmConfig,
    pristine: torch.nn.Module,
    images: ImageSet,
    targets: torch.Tensor,
    split: Split,
    seed: int,
    compute: Compute,
    cache: PrefixCache | None,
    reporter: Reporter,
) -> tuple[Network, list[dict]]:
    """A fresh copy of the arm's backbone + a new head, trained through the arm's stages."""
    torch.manual_seed(seed)
    net = prepare_network(Network.build(copy.deepcopy(pristine), arm.head, targets.shape[1]), compute)
    logs = []
    for i, stage in enumerate(arm.stages):
        stage_log = fit_stage(
            net, stage, images, split.train, targets, compute, cache, seed + 1000 * (i + 1),
            on_epoch=lambda e, entry, kind=stage.kind: reporter.epoch_done(kind, e, entry),
        )
        logs.append({"kind": stage.kind, "seconds": stage_log.seconds, "epochs": stage_log.epochs})
    return net, logs


def evaluate_fold(recipe: Recipe, cohort: Cohort, net: Network, images: ImageSet, split: Split,
                  compute: Compute, cache: PrefixCache | None) -> tuple[dict, pd.DataFrame]:
    """Threshold from training-part predictions; metrics on the test part at patient level."""
    t = cohort.table
    how = recipe.protocol.patient_aggregate
    y, patients = t["y"].to_numpy(), t["patient"].to_numpy()
    p_train = predict(net, images, split.train, compute, cache)[:, 0]
    s_train, y_train = patient_scores(p_train, y[split.train], patients[split.train], how)
    threshold = choose_threshold(y_train, s_train, recipe.protocol.threshold)
    p_test = predict(net, images, split.test, compute, cache)[:, 0]
    s_test, y_test = patient_scores(p_test, y[split.test], patients[split.test], how)
    metrics = binary_metrics(y_test, s_test, threshold)
    metrics["threshold"] = threshold
    metrics["train_auroc"] = binary_metrics(y_train, s_train, threshold)["auroc"]
    preds = pd.DataFrame({
        "repeat": split.repeat,
        "fold": split.fold,
        "row": t["row"].to_numpy()[split.test],
        "image": t["path"].to_numpy()[split.test],
        "patient": patients[split.test],
        "y": y[split.test],
        "prob": p_test.astype(np.float64),
        "pred": (p_test >= threshold).astype(int),
    })
    return metrics, preds


def run_study(recipe: Recipe, out_dir: str | Path, reporter: Reporter | None = None) -> StudyResult:
    """Run every arm on the same folds; resume from finished folds in `out_dir`."""
    reporter = reporter or _Silent()
    run = RunDir(Path(out_dir))
    run.start(recipe)
    handler = logging.FileHandler(run.path / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return _run(recipe, run, reporter)
    finally:
        log.removeHandler(handler)
        handler.close()


def _run(recipe: Recipe, run: RunDir, reporter: Reporter) -> StudyResult:
    t_start = time.perf_counter()
    compute = resolve_compute(recipe.compute)
    cohort = load_cohort(recipe.cohort)
    t = cohort.table
    sites = t["site"].to_numpy() if "site" in t else None
    splits = make_splits(t["y"].to_numpy(), t["patient"].to_numpy(), recipe.protocol, recipe.seed, sites)
    log.info("cohort %s: %d images, %d patients; %d splits; compute %s",
             recipe.cohort.manifest, cohort.n_images, cohort.n_patients, len(splits), compute.label)
    targets = torch.tensor(t["y"].to_numpy(), dtype=torch.float32).unsqueeze(1)
    images: ImageSet | None = None
    cache = PrefixCache() if compute.reuse_frozen else None
    reporter.start(len(recipe.arms) * len(splits))

    all_preds, arms_out = [], {}
    for arm in recipe.arms:
        fingerprint = arm_fingerprint(recipe, arm)
        pristine = None
        fold_results, arm_seconds = [], 0.0
        for split in splits:
            done = run.read_fold(arm.name, split.name, fingerprint)
            if done is not None:
                meta, preds = done
                reporter.fold_done(arm.name, split, meta["metrics"], resumed=True)
            else:
                if images is None:
                    images = load_image_set(recipe, cohort)
                if pristine is None:
                    pristine = _seeded_backbone(arm, recipe.seed)
                reporter.fold_started(arm.name, split, sum(s.epochs for s in arm.stages))
                seed = fold_seed(recipe.seed, split)
                t0 = time.perf_counter()
                net, stage_logs = train_fold(arm, pristine, images, targets, split, seed, compute, cache, reporter)
                metrics, preds = evaluate_fold(recipe, cohort, net, images, split, compute, cache)
                meta = {
                    "arm": arm.name, "repeat": split.repeat, "fold": split.fold, "seed": seed,
                    "fingerprint": fingerprint, "metrics": metrics, "seconds": time.perf_counter() - t0,
                    "n_train_images": int(len(split.train)), "n_test_images": int(len(split.test)),
                    "stages": stage_logs,
                }
                if recipe.compute.save_models:
                    model_path = run.folds_dir / arm.name / f"{split.name}.safetensors"
                    save_backbone(net.backbone, model_path)
                    torch.save(net.head.state_dict(), model_path.with_suffix(".head.pt"))
                preds.insert(0, "arm", arm.name)
                run.write_fold(arm.name, split.name, meta, preds)
                log.info("arm %s %s: %s", arm.name, split.name, {k: round(v, 4) for k, v in metrics.items()})
                reporter.fold_done(arm.name, split, metrics, resumed=False)
            fold_results.append(meta)
            arm_seconds += meta["seconds"]
            all_preds.append(preds)
        fold_metrics = [m["metrics"] for m in fold_results]
        arms_out[arm.name] = {
            "backbone": arm.backbone.name,
            "stages": [s.kind for s in arm.stages],
            "summary": summarize(fold_metrics),
            "folds": [{"repeat": m["repeat"], "fold": m["fold"], **m["metrics"]} for m in fold_results],
            "train_seconds": arm_seconds,
        }
    metrics = {
        "recipe": recipe.name,
        "seed": recipe.seed,
        "cohort": cohort.summary(),
        "protocol": recipe.protocol.model_dump(mode="json"),
        "n_splits": len(splits),
        "compute": compute.label,
        "arms": arms_out,
        "wall_seconds_this_session": time.perf_counter() - t_start,
    }
    predictions = pd.concat(all_preds, ignore_index=True)
    run.write_results(predictions, metrics)
    return StudyResult(run.path, metrics, predictions)
