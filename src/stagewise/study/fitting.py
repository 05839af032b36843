"""Fitting one unit on one fold: the state a study's folds share (`Study`: cohort, splits,
images, starting backbones, the frozen-prefix cache), training an arm through its stages,
baselines and the clinical model, and refitting an arm on every image.

Apart from the runner (plans folds, writes the run directory): an executor in another process
imports the fitting code only."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from stagewise.data import Cohort, load_cohort, load_images
from stagewise.evaluation.baselines import baseline_scores, clinical_model_scores, fold_standardize
from stagewise.evaluation.splits import cohort_splits, fold_seed, Split, subsample_patients
from stagewise.models import Network, save_backbone, save_network
from stagewise.study.progress import LineReporter
from stagewise.recipe import ArmConfig, Recipe, RecipeError
from stagewise.io import atomic_write, atomic_write_with
from stagewise.study.rundir import RunDir, pretrain_fingerprint
from stagewise.study.inner_fits import inner_fits, inner_scores_nonimage, wants_inner
from stagewise.evaluation.fold_scores import score_fold
from stagewise.errors import RunError
from stagewise.study.thread_choice import choose_threads, thread_chooser
from stagewise.study.saliency_maps import saliency_examples, site_saliency_examples
from stagewise.study.site_arms import export_refusal, fit_federated, fit_local, refit_federated
from stagewise.training.start import seeded_backbone, start_network
from stagewise.training.cache import load_image_set, ImageSet, PrefixCache
from stagewise.training.autotune import choose_compute, describe_timings, needs_measurement
from stagewise.training.compute import Compute, resolve_compute
from stagewise.training.engine import predict, prepare_network
from stagewise.training.stages import FoldData, stage_kind
from stagewise.study.units import Unit

log = logging.getLogger("stagewise")


class Reporter(Protocol):
    """What a progress display (the CLI's) receives, and optionally `message(text)` for notes;
    with a remote executor `fold_started`/`epoch_done` come from local fits only."""

    def start(self, total_folds: int) -> None: ...
    def fold_started(self, arm: str, split: Split, n_epochs: int) -> None: ...
    def epoch_done(self, stage: str, epoch: int, entry: dict) -> None: ...
    def fold_done(self, arm: str, split: Split, metrics: dict, resumed: bool) -> None: ...


class SilentReporter:
    def start(self, total_folds):
        pass

    def fold_started(self, arm, split, n_epochs):
        pass

    def epoch_done(self, stage, epoch, entry):
        pass

    def fold_done(self, arm, split, metrics, resumed):
        pass


def train_fold(
    arm: ArmConfig,
    pristine: torch.nn.Module,
    images: ImageSet,
    targets: torch.Tensor,
    train: np.ndarray,
    seed: int,
    compute: Compute,
    cache: PrefixCache | None,
    reporter: Reporter,
    clinical: torch.Tensor | None = None,
    unlabeled: np.ndarray | None = None,
) -> tuple[Network, list[dict]]:
    """A fresh copy of the arm's backbone + a new head, trained through the arm's stages.

    `clinical` (one standardised row per image) is joined to the image features when the
    arm's head fuses clinical data. `unlabeled` are the rows an ssl stage on the target may
    use (default `train`): at a label fraction, every training image without its label."""
    torch.manual_seed(seed)
    n_extra = 0 if clinical is None else clinical.shape[1]
    net = Network.build(copy.deepcopy(pristine), targets.shape[1], n_extra, arm.head.dropout, arm.head.hidden,
                        pretrained_head=arm.head.pretrained)
    net = prepare_network(net, compute)
    logs = []
    data = FoldData(images, train, targets, extra=clinical, unlabeled=unlabeled)
    for i, stage in enumerate(arm.stages):
        if stage.external:  # ran once for the arm, before cross-validation (see Study.pristine)
            continue
        on_epoch = lambda e, entry, kind=stage.kind: reporter.epoch_done(kind, e, entry)  # noqa: E731
        stage_log = stage_kind(stage).fit_fold(net, stage, data, compute, cache, seed + 1000 * (i + 1), on_epoch)
        logs.append({"kind": stage.kind, "seconds": stage_log.seconds, "memory": stage_log.memory, "epochs": stage_log.epochs})
    return net, logs


class Study:
    """State shared by the folds of one run: cohort, images (loaded on first need), cache."""

    def __init__(self, recipe: Recipe, run: RunDir, reporter: Reporter, cohort: Cohort | None = None):
        self.recipe, self.run, self.reporter = recipe, run, reporter
        self.compute = resolve_compute(recipe.compute)
        self.cohort = cohort or load_cohort(recipe.cohort, decode=True)  # every image decoded before training
        t = self.cohort.table
        self.y, self.patients = t["y"].to_numpy(), t["patient"].to_numpy()
        self.splits = cohort_splits(t, recipe.protocol, recipe.seed)
        self.targets = torch.tensor(self.cohort.targets(), dtype=torch.float32)
        self.cache = PrefixCache() if self.compute.reuse_frozen else None
        self.compute_choices: dict[str, dict] = {}
        """Arm -> how its precision and layout were chosen (`compute: auto`)."""
        self.threads, self.thread_choices = thread_chooser(recipe), []
        """`compute.threads: auto`: the chooser and each choice (study/thread_choice.py)."""
        self._images: ImageSet | None = None
        self._pristine: dict[str, torch.nn.Module] = {}
        self._computes: dict[str, Compute] = {}

    def check_threads(self, arm: ArmConfig) -> None:
        """`compute.threads: auto`: choose before the first fold, again when the load has moved."""
        if self.threads is not None and self.threads.due():
            choose_threads(self, arm)

    def compute_for(self, arm: ArmConfig) -> Compute:
        """The arm's device, precision and layout: the recipe's, or with `auto` the fastest
        measured for its architecture, image size and batch size on this machine (once per
        arm; a fit in another process on the same kind of device takes the driver's choice)."""
        if not needs_measurement(self.recipe.compute):
            return self.compute
        if arm.name not in self._computes:
            known = self.compute_choices.get(arm.name)
            if known is not None and known.get("device") == self.compute.device.type:
                cfg = self.recipe.compute.model_copy(update={k: known[k] for k in ("precision", "channels_last")})
                self._computes[arm.name] = resolve_compute(cfg)
            else:
                batch = max(s.batch_size for s in arm.stages)
                compute, record = choose_compute(self.recipe.compute, seeded_backbone(arm, self.recipe.seed),
                                                 self.recipe.data.image_size, batch)
                self._computes[arm.name], self.compute_choices[arm.name] = compute, record
                log.info("arm %s: compute %s (%s)", arm.name, compute.label, describe_timings(record))
        return self._computes[arm.name]

    @property
    def images(self) -> ImageSet:
        if self._images is None:
            self._images = load_image_set(self.recipe, self.cohort)
        return self._images

    def compute_label(self, arms: list[ArmConfig]) -> str:
        """The compute of these arms (each chosen now, if `auto`): one label if they share it,
        else one per arm."""
        labels = {arm.name: self.compute_for(arm).label for arm in arms}
        if len(set(labels.values())) <= 1:
            return next(iter(labels.values()), self.compute.label)
        return "; ".join(f"{name}: {label}" for name, label in labels.items())

    def pristine(self, arm: ArmConfig) -> torch.nn.Module:
        """The backbone every fold of the arm starts from: the named weights, after the arm's
        stages on source manifests (run once and saved, so a resumed run reads them back)."""
        if arm.name not in self._pristine:
            backbone = seeded_backbone(arm, self.recipe.seed)
            external = [s for s in arm.stages if s.external]
            if external:
                backbone = self._pretrained(arm, backbone, external)
            self._pristine[arm.name] = backbone
        return self._pristine[arm.name]

    def _pretrained(self, arm: ArmConfig, backbone, stages) -> torch.nn.Module:
        from safetensors.torch import load_file

        from stagewise.data.source import load_source

        path = self.run.pretrained_path(arm.name, pretrain_fingerprint(self.recipe, arm))
        if path.is_file():
            try:
                backbone.net.load_state_dict(load_file(str(path)))
                return backbone
            except Exception as err:  # a truncated or foreign file: set aside, pretrain again
                log.warning("pretrained backbone %s is damaged (%s: %s); set aside and made again",
                            path.name, type(err).__name__, str(err)[:120])
                os.replace(path, path.with_name(path.name + ".damaged"))
        compute = self.compute_for(arm)
        backbone = backbone.to(compute.device)
        logs = []
        for i, stage in enumerate(stages):
            source = load_source(stage.source)
            x = load_images(source.paths, self.recipe.data.image_size, self.recipe.data.resize)
            images = ImageSet(x, f"source:{stage.source.manifest}:{len(x)}")
            self.reporter.fold_started(f"{arm.name} {stage.kind}", Split(-1, i, np.arange(0), np.arange(0)), stage.epochs)
            on_epoch = lambda e, entry, kind=stage.kind: self.reporter.epoch_done(kind, e, entry)  # noqa: E731
            seed = self.recipe.seed + 7919 * (i + 1)
            log_ = stage_kind(stage).fit_source(backbone, stage, images, source, compute, seed, on_epoch)
            logs.append({"kind": stage.kind, "source": str(stage.source.manifest), "images": len(images),
                         "seconds": log_.seconds, "memory": log_.memory, "epochs": log_.epochs})
            log.info("arm %s: %s on %s (%d images) in %.0f s", arm.name, stage.kind, stage.source.manifest,
                     len(images), log_.seconds)
        backbone = backbone.cpu()
        atomic_write_with(path, lambda tmp: save_backbone(backbone, tmp))
        atomic_write(path.with_suffix(".json"), json.dumps(logs, indent=1))
        return backbone

    def fit_model(self, unit: Unit, split: Split) -> tuple[dict, pd.DataFrame, dict]:
        seed = fold_seed(self.recipe.seed, split)
        train = subsample_patients(split.train, self.y, self.patients, unit.fraction, seed)
        extra, pooled, rule = {}, unit.arm.sites.mode == "pooled", self.recipe.protocol.threshold
        inner = inner_fits(unit.arm, train, self.y, self.patients, seed, rule if pooled else None,
                           self.recipe.protocol.patient_aggregate,
                           lambda cand, a, b: self.fit_predict(unit.arm, cand, a, b, seed))
        arm = inner.arm
        if inner.tuning:
            extra["tuning"] = inner.tuning
        if inner.record or (not pooled and wants_inner(rule)):
            extra["threshold_inner"] = inner.record or {"fallback": "a local or federated arm: chosen on the training "
                                                                    "part's scores (no inner fits per site)"}
        self.pristine(unit.arm)  # an arm's stages on source manifests run (once) before its first fold starts
        self.check_threads(unit.arm)
        self.reporter.fold_started(unit.name, split, sum(s.epochs for s in arm.stages if not s.external))
        if not pooled:
            return self._fit_sites(unit, split, train, seed, extra)
        clinical = self.clinical_features(train) if arm.head.fusion else None
        compute = self.compute_for(unit.arm)
        net, stage_logs = train_fold(arm, self.pristine(unit.arm), self.images, self.targets, train, seed,
                                     compute, self.cache, self.reporter, clinical, unlabeled=split.train)
        p_train = predict(net, self.images, train, compute, self.cache, extra=clinical)
        p_test = predict(net, self.images, split.test, compute, self.cache, extra=clinical)
        metrics, preds = score_fold(self.recipe, self.cohort, split, train, p_train, p_test, recalibrate=True,
                                    p_inner=inner.p_inner, model=unit.name)
        extra["compute"], extra["threads"] = compute.label, torch.get_num_threads()  # what this fold ran with
        extra["stages"] = stage_logs
        extra["n_train_images"] = int(len(train))
        folder = self.run.folds_dir / unit.folder
        if self.recipe.compute.save_models:
            save_network(net, folder / f"{split.name}.safetensors")
        if self.recipe.evaluation.saliency and split.repeat == 0 and unit.fraction == 1.0 and clinical is None:
            extra["saliency"] = self._saliency(net, split, preds, folder / "saliency", metrics["threshold"])
        return metrics, preds, extra

    def _fit_sites(self, unit: Unit, split: Split, train: np.ndarray, seed: int, extra: dict):
        """A local or federated arm on this fold (see stagewise.study.site_arms)."""
        arm, sites = unit.arm, self.cohort.table["site"].astype(str).to_numpy()
        start = start_network(arm, self.pristine(arm), self.targets.shape[1], seed)
        rows = np.concatenate([train, split.test])
        compute = self.compute_for(unit.arm)
        t0 = time.perf_counter()
        scoring = (self.y, self.patients, split.test, self.recipe.protocol.patient_aggregate)
        fit = (fit_local(arm, start, self.images, self.targets, sites, train, rows, compute, self.cache, seed, *scoring)
               if arm.sites.mode == "local" else
               fit_federated(arm, start, self.images, self.targets, sites, train, rows, compute, seed, *scoring))
        metrics, preds = score_fold(self.recipe, self.cohort, split, train, fit.prob[: len(train)], fit.prob[len(train):],
                                    recalibrate=True, model=unit.name)
        preds = fit.with_global_scores(preds)
        extra["sites_training"] = fit.info
        if self.recipe.evaluation.saliency and split.repeat == 0 and unit.fraction == 1.0 and fit.server is not None:
            extra["saliency"] = self._site_saliency(fit.server, split, self.run.folds_dir / unit.folder / "saliency",
                                                    metrics["threshold"], compute)
        extra["compute"], extra["threads"] = compute.label, torch.get_num_threads()  # what this fold ran with
        extra["stages"] = [{"kind": "+".join(s.kind for s in arm.stages if not s.external),
                            "seconds": time.perf_counter() - t0, "memory": {}, "epochs": []}]
        extra["n_train_images"] = int(len(train))
        return metrics, preds, extra

    def clinical_features(self, train: np.ndarray) -> torch.Tensor:
        """Clinical columns imputed and standardised with statistics of the training rows only."""
        x = self.cohort.table[self.recipe.cohort.clinical].to_numpy(dtype=float)
        return torch.tensor(fold_standardize(x, train), dtype=torch.float32)

    def fit_predict(self, base: ArmConfig, candidate: ArmConfig, rows_fit: np.ndarray, rows_score: np.ndarray,
                     seed: int) -> np.ndarray:
        """An inner fit (nested CV, inner-CV thresholds): `candidate` trained on `rows_fit`, its
        scores of `rows_score`; from the backbone and compute of the arm `base`."""
        clinical = self.clinical_features(rows_fit) if base.head.fusion else None
        compute = self.compute_for(base)
        net, _ = train_fold(candidate, self.pristine(base), self.images, self.targets, rows_fit, seed,
                            compute, self.cache, SilentReporter(), clinical)
        return predict(net, self.images, rows_score, compute, self.cache, extra=clinical)

    def _saliency(self, net: Network, split: Split, preds: pd.DataFrame, folder: Path, threshold: float) -> list[dict]:
        """A pooled fold's maps: its fold model on the fold's test images (see saliency_maps)."""
        n = math.ceil(self.recipe.evaluation.saliency / self.recipe.protocol.folds)
        return saliency_examples(net, self.images.x, split.test, preds["row"].to_numpy(), preds["y"].to_numpy(),
                                 preds["prob"].to_numpy(), threshold, n, folder, self.run.path, split.name)

    def _site_saliency(self, net: Network, split: Split, folder: Path, threshold: float, compute: Compute) -> list[dict]:
        """A federated fold's maps: the final global model at each site, on its own test images;
        as many per site as a pooled fold draws in all, spread over the sites."""
        t = self.cohort.table
        sites = t["site"].astype(str).to_numpy()[split.test]
        n = max(1, math.ceil(math.ceil(self.recipe.evaluation.saliency / self.recipe.protocol.folds) / len(set(sites))))
        return site_saliency_examples(net, self.images, split.test, t["row"].to_numpy()[split.test],
                                      self.y[split.test], sites, threshold, n, folder, self.run.path, split.name,
                                      compute)

    def fit_nonimage(self, unit: Unit, split: Split) -> tuple[dict, pd.DataFrame, dict]:
        t = self.cohort.table
        seed = fold_seed(self.recipe.seed, split)
        if unit.kind == "baseline":
            values = t[unit.column].to_numpy(dtype=float)
            scores, direction = baseline_scores(values, self.y, split.train)
            extra, refit = {"direction": direction}, lambda a, b: baseline_scores(values, self.y, a)[0][b]
        else:
            x = t[self.recipe.cohort.clinical].to_numpy(dtype=float)
            scores = clinical_model_scores(x, self.y, self.patients, split.train, seed)
            extra = {"columns": list(self.recipe.cohort.clinical)}
            refit = lambda a, b: clinical_model_scores(x, self.y, self.patients, a, seed)[b]  # noqa: E731
        p_inner, record = inner_scores_nonimage(split.train, self.y, self.patients, seed, self.recipe.protocol.threshold,
                                                refit)
        extra |= {"threshold_inner": record} if record else {}
        metrics, preds = score_fold(self.recipe, self.cohort, split, split.train, scores[split.train], scores[split.test],
                                    p_inner=p_inner)
        return metrics, preds, extra


@dataclass
class FoldOutput:
    """What one (unit, fold) fit produces, wherever it ran."""

    metrics: dict
    predictions: pd.DataFrame
    extra: dict
    """Recorded in the fold's json: stage logs, tuning, saliency, ..."""
    seconds: float
    files: dict[str, bytes] = field(default_factory=dict)
    """Files a remote fit made (saved fold model, saliency PNGs), by path relative to the run
    directory, for the driver to write; empty for a local fit, which writes them itself."""


def fit_fold(study: Study, unit: Unit, split: Split) -> FoldOutput:
    """Fit one unit on one fold (a model arm, a baseline score or the clinical model)."""
    t0 = time.perf_counter()
    fit = study.fit_model if unit.kind == "model" else study.fit_nonimage
    metrics, preds, extra = fit(unit, split)
    return FoldOutput(metrics, preds, extra, time.perf_counter() - t0)


_PROCESS_LOCAL = ("run", "reporter", "cache", "_images", "_pristine", "_computes", "threads")
"""Study attributes that stay in their process: remote fits get their own."""


def study_state(study: Study) -> dict:
    """What a fit in another process needs of a study: all but what `_PROCESS_LOCAL` names,
    which a remote executor sends or makes separately."""
    return {k: v for k, v in vars(study).items() if k not in _PROCESS_LOCAL}


def study_from_state(state: dict, run: RunDir, images: ImageSet | None, pristine: dict[str, torch.nn.Module],
                     cache: PrefixCache | None, reporter: Reporter) -> Study:
    """The study of `study_state` in this process: fits write into `run` (a private folder),
    start from `pristine` backbones (by arm name) and run on this process's device."""
    study = Study.__new__(Study)
    vars(study).update(state)
    study.run, study.reporter, study._images, study._pristine = run, reporter, images, dict(pristine)
    study.threads = None  # a remote fit's threads are its executor's
    study._computes = {}  # chosen here from the driver's compute_choices (same kind of device) or measured
    study.compute = resolve_compute(study.recipe.compute)  # this worker's device, not the driver's
    study.cache = cache if study.compute.reuse_frozen else None
    return study


def refit(recipe: Recipe, arm: str, run_dir: str | Path, reporter: Reporter | None = None) -> Network:
    """The arm trained on every image of the cohort (`refit_arm`'s network)."""
    return refit_arm(recipe, arm, run_dir, reporter)[0]


def refit_arm(recipe: Recipe, arm: str, run_dir: str | Path, reporter: Reporter | None = None) -> tuple[Network, dict]:
    """The arm trained through its stages on every image of the cohort (no test part), as
    scikit-learn's search refits its best estimator on all the data, and how it was trained
    (`description` in words): a pooled arm centrally, a federated arm federated (Flower's
    simulation engine, every image of each site a training row; the final global model).
    A local arm (one model per site) and a FedBN arm (no global model) are refused.

    Stages on source manifests are not run again: the backbone they made is read from the
    run directory's pretrained/ folder (made by `run_study` on the same recipe)."""
    configs = {a.name: a for a in recipe.arms}
    if arm not in configs:
        raise RecipeError(f"no model arm {arm!r}; arms: {sorted(configs)}")
    config = configs[arm]
    refusal = export_refusal(config, refit=True)
    if refusal:
        raise RunError(refusal)
    study = Study(recipe, RunDir(Path(run_dir)), reporter or LineReporter(epochs=True))
    everything = np.arange(study.cohort.n_images)
    study.reporter.fold_started(f"refit {arm} on every image", Split(-1, -1, np.arange(0), np.arange(0)),
                                sum(s.epochs for s in config.stages))
    if config.sites.mode == "federated":
        start = start_network(config, study.pristine(config), study.targets.shape[1], recipe.seed)
        sites = study.cohort.table["site"].astype(str).to_numpy()
        return refit_federated(config, start, study.images, study.targets, sites, study.compute_for(config),
                               recipe.seed)
    net, _ = train_fold(config, study.pristine(config), study.images, study.targets, everything,
                        recipe.seed, study.compute_for(config), study.cache, study.reporter)
    return net.cpu(), {"mode": "pooled", "images": int(len(everything)),
                       "description": f"pooled: trained centrally on every image of the cohort ({len(everything)} images)"}
