"""Run a study: recipe -> cohort -> splits -> (per unit and fold: fit -> predictions) ->
metrics -> evidence -> report. Every unit runs on exactly the same folds.

A *unit* is one column of results: a model arm (possibly at a fraction of the training
labels), a baseline score column, or the clinical-only model.
"""

from __future__ import annotations

import copy
import hashlib
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

from stagewise.checks import check_study
from stagewise.data import Cohort, load_cohort, load_images
from stagewise.evaluation.baselines import baseline_scores, clinical_model_scores, fold_standardize
from stagewise.evaluation.evidence import compute_evidence
from stagewise.evaluation.metrics import binary_metrics, choose_threshold, patient_scores, summarize
from stagewise.evaluation.splits import Split, make_splits, subsample_patients
from stagewise.models import Network, create_backbone, save_backbone, save_network
from stagewise.recipe import ArmConfig, ProtocolConfig, Recipe, RecipeError, SslStage
from stagewise.runs import RunDir, RunError, atomic_write, cohort_digest, pretrain_fingerprint, unit_fingerprint
from stagewise.sites import fit_federated, fit_local, start_network
from stagewise.training.cache import ImageSet, PrefixCache
from stagewise.training.compute import Compute, resolve_compute
from stagewise.training.engine import fit_stage, predict, prepare_network
from stagewise.training.pretrain import fit_ssl
from stagewise.training.tuning import choose_by_inner_cv
from stagewise.units import Unit, study_units

log = logging.getLogger("stagewise")


class Reporter(Protocol):
    """What a progress display receives; the CLI's rich display implements it. A reporter
    may also have `message(text)`, for one-line notes (how many fits a Ray run runs at once,
    and where); with a remote executor `fold_done` comes as each fit's result arrives, and
    `fold_started`/`epoch_done` come from local fits only."""

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


def seeded_backbone(arm: ArmConfig, seed: int) -> torch.nn.Module:
    """The arm's starting backbone; random (scratch) weights depend on the recipe seed only,
    not on how much training ran before in this process, so a resumed run matches."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_backbone(**arm.backbone.model_dump())


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
    net = prepare_network(Network.build(copy.deepcopy(pristine), targets.shape[1], n_extra, arm.head.dropout, arm.head.hidden), compute)
    logs = []
    for i, stage in enumerate(arm.stages):
        if stage.external:  # ran once for the arm, before cross-validation (see _Study.pristine)
            continue
        on_epoch = lambda e, entry, kind=stage.kind: reporter.epoch_done(kind, e, entry)  # noqa: E731
        if isinstance(stage, SslStage):  # on this fold's training images only, labels ignored
            rows = train if unlabeled is None else unlabeled
            stage_log = fit_ssl(net.backbone, stage, images, rows, compute, seed + 1000 * (i + 1), on_epoch)
        else:
            stage_log = fit_stage(net, stage, images, train, targets, compute, cache, seed + 1000 * (i + 1), on_epoch,
                                  extra=clinical)
        logs.append({"kind": stage.kind, "seconds": stage_log.seconds, "memory": stage_log.memory, "epochs": stage_log.epochs})
    return net, logs


def _task_metrics(recipe: Recipe, y: np.ndarray, patients: np.ndarray, train: np.ndarray, test: np.ndarray,
                  p_train: np.ndarray, p_test: np.ndarray) -> dict:
    """Threshold from training-part scores; metrics on the test part at patient level.

    Rows without a score (a baseline value not recorded) or without a label (a secondary
    outcome not known) are left out.
    """
    how = recipe.protocol.patient_aggregate
    ok_train = ~np.isnan(p_train) & ~np.isnan(y[train])
    ok_test = ~np.isnan(p_test) & ~np.isnan(y[test])
    s_train, y_train = patient_scores(p_train[ok_train], y[train][ok_train], patients[train][ok_train], how)
    threshold = choose_threshold(y_train.astype(int), s_train, recipe.protocol.threshold)
    s_test, y_test = patient_scores(p_test[ok_test], y[test][ok_test], patients[test][ok_test], how)
    metrics = binary_metrics(y_test.astype(int), s_test, threshold)
    metrics["threshold"] = threshold
    metrics["train_auroc"] = binary_metrics(y_train.astype(int), s_train, threshold)["auroc"]
    metrics["n_test_patients"] = int(len(s_test))
    metrics["n_train_patients"] = int(len(s_train))
    return metrics


def score_fold(recipe: Recipe, cohort: Cohort, split: Split, train: np.ndarray,
               p_train: np.ndarray, p_test: np.ndarray) -> tuple[dict, pd.DataFrame]:
    """Metrics of the primary outcome (top level) and of each extra outcome (`tasks`), and
    the test predictions. `p_train`/`p_test` have one column per outcome the unit predicts."""
    t = cohort.table
    patients, test = t["patient"].to_numpy(), split.test
    labels = cohort.targets()
    p_train, p_test = p_train.reshape(len(train), -1), p_test.reshape(len(test), -1)
    metrics = _task_metrics(recipe, labels[:, 0], patients, train, test, p_train[:, 0], p_test[:, 0])
    threshold = metrics["threshold"]
    preds = pd.DataFrame({
        "repeat": split.repeat,
        "fold": split.fold,
        "row": t["row"].to_numpy()[test],
        "image": t["path"].to_numpy()[test],
        "patient": patients[test],
        "y": t["y"].to_numpy()[test],
        "prob": p_test[:, 0].astype(np.float64),
        "pred": np.where(~np.isnan(p_test[:, 0]), (p_test[:, 0] >= threshold).astype(float), np.nan),
    })
    if "site" in t:  # per-site figures on the same patients, for every unit
        site = t["site"].astype(str).to_numpy()
        preds["site"] = site[test]
        metrics["sites"] = _site_metrics(recipe, site[test], labels[test, 0], patients[test], p_test[:, 0], threshold)
    if p_test.shape[1] > 1:
        metrics["tasks"] = {}
        for j, task in enumerate(cohort.tasks[1:], start=1):
            metrics["tasks"][task] = _task_metrics(recipe, labels[:, j], patients, train, test, p_train[:, j], p_test[:, j])
            preds[f"y:{task}"] = labels[test, j]
            preds[f"prob:{task}"] = p_test[:, j].astype(np.float64)
    return metrics, preds


def _site_metrics(recipe: Recipe, site: np.ndarray, y: np.ndarray, patients: np.ndarray, p: np.ndarray,
                  threshold: float) -> dict:
    out = {}
    for s in dict.fromkeys(site):
        ok = (site == s) & ~np.isnan(p) & ~np.isnan(y)
        sc, yy = patient_scores(p[ok], y[ok], patients[ok], recipe.protocol.patient_aggregate)
        out[s] = binary_metrics(yy.astype(int), sc, threshold) | {"n_test_patients": int(len(sc))}
    return out


class _Study:
    """State shared by the folds of one run: cohort, images (loaded on first need), cache."""

    def __init__(self, recipe: Recipe, run: RunDir, reporter: Reporter, cohort: Cohort | None = None):
        self.recipe, self.run, self.reporter = recipe, run, reporter
        self.compute = resolve_compute(recipe.compute)
        self.cohort = cohort or load_cohort(recipe.cohort, decode=True)  # every image decoded before training
        t = self.cohort.table
        self.y, self.patients = t["y"].to_numpy(), t["patient"].to_numpy()
        sites = t["site"].to_numpy() if "site" in t else None
        self.splits = make_splits(self.y, self.patients, recipe.protocol, recipe.seed, sites)
        self.targets = torch.tensor(self.cohort.targets(), dtype=torch.float32)
        self.cache = PrefixCache() if self.compute.reuse_frozen else None
        self._images: ImageSet | None = None
        self._pristine: dict[str, torch.nn.Module] = {}
        columns = [c for c in t.columns if c != "path"]
        self.cohort_digest = cohort_digest(t, columns)
        """Content of the cohort (rows, labels, patients, image bytes): part of every fold's fingerprint."""

    @property
    def images(self) -> ImageSet:
        if self._images is None:
            self._images = load_image_set(self.recipe, self.cohort)
        return self._images

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
        from stagewise.training.pretrain import pretrain_supervised

        path = self.run.pretrained_path(arm.name, pretrain_fingerprint(self.recipe, arm))
        if path.is_file():
            try:
                backbone.net.load_state_dict(load_file(str(path)))
                return backbone
            except Exception as err:  # a truncated or foreign file: set aside, pretrain again
                log.warning("pretrained backbone %s is damaged (%s: %s); set aside and made again",
                            path.name, type(err).__name__, str(err)[:120])
                os.replace(path, path.with_name(path.name + ".damaged"))
        backbone = backbone.to(self.compute.device)
        logs = []
        for i, stage in enumerate(stages):
            source = load_source(stage.source)
            x = load_images(source.paths, self.recipe.data.image_size, self.recipe.data.resize)
            images = ImageSet(x, f"source:{stage.source.manifest}:{len(x)}")
            self.reporter.fold_started(f"{arm.name} {stage.kind}", Split(-1, i, np.arange(0), np.arange(0)), stage.epochs)
            on_epoch = lambda e, entry, kind=stage.kind: self.reporter.epoch_done(kind, e, entry)  # noqa: E731
            seed = self.recipe.seed + 7919 * (i + 1)
            if isinstance(stage, SslStage):
                log_ = fit_ssl(backbone, stage, images, np.arange(len(images)), self.compute, seed, on_epoch)
            else:
                log_ = pretrain_supervised(backbone, stage, images, source, self.compute, seed, on_epoch)
            logs.append({"kind": stage.kind, "source": str(stage.source.manifest), "images": len(images),
                         "seconds": log_.seconds, "memory": log_.memory, "epochs": log_.epochs})
            log.info("arm %s: %s on %s (%d images) in %.0f s", arm.name, stage.kind, stage.source.manifest,
                     len(images), log_.seconds)
        backbone = backbone.cpu()
        tmp = path.with_name(path.name + ".tmp")
        save_backbone(backbone, tmp)
        os.replace(tmp, path)
        atomic_write(path.with_suffix(".json"), json.dumps(logs, indent=1))
        return backbone

    def fit_model(self, unit: Unit, split: Split) -> tuple[dict, pd.DataFrame, dict]:
        seed = fold_seed(self.recipe.seed, split)
        train = subsample_patients(split.train, self.y, self.patients, unit.fraction, seed)
        arm, extra = unit.arm, {}
        if arm.tune is not None:
            point, table = self._tune(arm, train, seed)
            arm = arm.with_values(point)
            extra["tuning"] = {"chosen": point, "grid": table}
        self.reporter.fold_started(unit.name, split, sum(s.epochs for s in arm.stages))
        if arm.sites.mode != "pooled":
            return self._fit_sites(unit, split, train, seed, extra)
        clinical = self.clinical_features(train) if arm.head.fusion else None
        net, stage_logs = train_fold(arm, self.pristine(unit.arm), self.images, self.targets, train, seed,
                                     self.compute, self.cache, self.reporter, clinical, unlabeled=split.train)
        p_train = predict(net, self.images, train, self.compute, self.cache, extra=clinical)
        p_test = predict(net, self.images, split.test, self.compute, self.cache, extra=clinical)
        metrics, preds = score_fold(self.recipe, self.cohort, split, train, p_train, p_test)
        extra["stages"] = stage_logs
        extra["n_train_images"] = int(len(train))
        folder = self.run.folds_dir / unit.folder
        if self.recipe.compute.save_models:
            save_network(net, folder / f"{split.name}.safetensors")
        if self.recipe.evaluation.saliency and split.repeat == 0 and unit.fraction == 1.0 and clinical is None:
            extra["saliency"] = self._saliency(net, split, preds, folder / "saliency")
        return metrics, preds, extra

    def _fit_sites(self, unit: Unit, split: Split, train: np.ndarray, seed: int, extra: dict):
        """A local or federated arm on this fold (see stagewise.sites)."""
        arm, sites = unit.arm, self.cohort.table["site"].astype(str).to_numpy()
        start = start_network(arm, self.pristine(arm), self.targets.shape[1], seed)
        rows = np.concatenate([train, split.test])
        t0 = time.perf_counter()
        if arm.sites.mode == "local":
            fit = fit_local(arm, start, self.images, self.targets, sites, train, rows, self.compute, self.cache, seed,
                            self.y, self.patients, split.test, self.recipe.protocol.patient_aggregate)
        else:
            fit = fit_federated(arm, start, self.images, self.targets, sites, train, rows, self.compute, seed)
        metrics, preds = score_fold(self.recipe, self.cohort, split, train, fit.prob[: len(train)], fit.prob[len(train):])
        extra["sites_training"] = fit.info
        extra["stages"] = [{"kind": "+".join(s.kind for s in arm.stages if not s.external),
                            "seconds": time.perf_counter() - t0, "memory": {}, "epochs": []}]
        extra["n_train_images"] = int(len(train))
        return metrics, preds, extra

    def clinical_features(self, train: np.ndarray) -> torch.Tensor:
        """Clinical columns imputed and standardised with statistics of the training rows only."""
        x = self.cohort.table[self.recipe.cohort.clinical].to_numpy(dtype=float)
        return torch.tensor(fold_standardize(x, train), dtype=torch.float32)

    def _tune(self, arm: ArmConfig, train: np.ndarray, seed: int):
        inner_protocol = ProtocolConfig(folds=arm.tune.inner_folds, repeats=1)
        inner = make_splits(self.y[train], self.patients[train], inner_protocol, seed)

        def score(candidate: ArmConfig, inner_train: np.ndarray, inner_test: np.ndarray) -> float:
            rows_train, rows_test = train[inner_train], train[inner_test]
            clinical = self.clinical_features(rows_train) if arm.head.fusion else None
            net, _ = train_fold(candidate, self.pristine(arm), self.images, self.targets, rows_train, seed,
                                self.compute, self.cache, _Silent(), clinical)
            p = predict(net, self.images, rows_test, self.compute, self.cache, extra=clinical)[:, 0]
            s, y = patient_scores(p, self.y[rows_test], self.patients[rows_test], self.recipe.protocol.patient_aggregate)
            return binary_metrics(y, s, 0.5)["auroc"]

        return choose_by_inner_cv(arm, inner, score)

    def _saliency(self, net: Network, split: Split, preds: pd.DataFrame, folder: Path) -> list[dict]:
        from stagewise.report.saliency import gradcam, pick_examples, save_overlay

        per_fold = math.ceil(self.recipe.evaluation.saliency / self.recipe.protocol.folds)
        pos = pick_examples(preds["y"].to_numpy(), preds["prob"].to_numpy(), preds["pred"].to_numpy(), per_fold)
        if not pos:
            return []
        rows = split.test[pos]
        x = self.images.x[torch.as_tensor(rows)]
        maps = gradcam(copy.deepcopy(net).cpu(), x)
        if maps is None:
            return []
        out = []
        for i, p in enumerate(pos):
            rec = preds.iloc[p]
            correct = bool(rec["pred"] == rec["y"])
            title = f"{'correct' if correct else 'WRONG'}: y={int(rec['y'])} p={rec['prob']:.2f}\nmanifest row {int(rec['row'])}"
            path = save_overlay(x[i, 0].float().numpy(), maps[i], folder / f"{split.name}-row{int(rec['row'])}.png", title)
            out.append({"file": str(path.relative_to(self.run.path)), "row": int(rec["row"]), "y": int(rec["y"]),
                        "prob": float(rec["prob"]), "correct": correct})
        return out

    def fit_nonimage(self, unit: Unit, split: Split) -> tuple[dict, pd.DataFrame, dict]:
        t = self.cohort.table
        if unit.kind == "baseline":
            scores, direction = baseline_scores(t[unit.column].to_numpy(dtype=float), self.y, split.train)
            extra = {"direction": direction}
        else:
            x = t[self.recipe.cohort.clinical].to_numpy(dtype=float)
            scores = clinical_model_scores(x, self.y, self.patients, split.train, fold_seed(self.recipe.seed, split))
            extra = {"columns": list(self.recipe.cohort.clinical)}
        metrics, preds = score_fold(self.recipe, self.cohort, split, split.train, scores[split.train], scores[split.test])
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


def fit_fold(study: _Study, unit: Unit, split: Split) -> FoldOutput:
    """Fit one unit on one fold (a model arm, a baseline score or the clinical model)."""
    t0 = time.perf_counter()
    fit = study.fit_model if unit.kind == "model" else study.fit_nonimage
    metrics, preds, extra = fit(unit, split)
    return FoldOutput(metrics, preds, extra, time.perf_counter() - t0)


def record_fold(run: RunDir, recipe: Recipe, unit: Unit, split: Split, fingerprint: str, out: FoldOutput,
                reporter: Reporter) -> tuple[dict, pd.DataFrame]:
    """Write a finished fold into the run directory (its files first: a fold counts as done
    once its json exists), log it and report it; return its meta and predictions."""
    for name, data in out.files.items():
        path = run.path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise RunError(f"{unit.name} {split.name}: a fit returned a file outside the run directory: {name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    meta = {"unit": unit.name, "kind": unit.kind, "repeat": split.repeat, "fold": split.fold,
            "seed": fold_seed(recipe.seed, split), "fingerprint": fingerprint, "metrics": out.metrics,
            "seconds": out.seconds, "n_test_images": int(len(split.test)), **out.extra}
    preds = out.predictions
    preds.insert(0, "arm", unit.name)
    run.write_fold(unit.folder, split.name, meta, preds)
    log.info("%s %s: %s", unit.name, split.name,
             {k: round(v, 4) for k, v in out.metrics.items() if isinstance(v, float)})
    reporter.fold_done(unit.name, split, out.metrics, resumed=False)
    return meta, preds


_PROCESS_LOCAL = ("run", "reporter", "cache", "_images", "_pristine")
"""_Study attributes that stay in their process: remote fits get their own."""


def study_state(study: _Study) -> dict:
    """What a fit in another process needs of a study (recipe, cohort table, splits, targets,
    ...): everything but the run directory, the progress display, the prefix cache, the
    images and the backbones, which a remote executor sends or makes separately."""
    return {k: v for k, v in vars(study).items() if k not in _PROCESS_LOCAL}


def study_from_state(state: dict, run: RunDir, images: ImageSet | None, pristine: dict[str, torch.nn.Module],
                     cache: PrefixCache | None, reporter: Reporter) -> _Study:
    """The study of `study_state` in this process: fits write into `run` (a private folder),
    start from `pristine` backbones (by arm name) and run on this process's device."""
    study = _Study.__new__(_Study)
    vars(study).update(state)
    study.run, study.reporter, study._images, study._pristine = run, reporter, images, dict(pristine)
    study.compute = resolve_compute(study.recipe.compute)  # this worker's device, not the driver's
    study.cache = cache if study.compute.reuse_frozen else None
    return study


def refit(recipe: Recipe, arm: str, run_dir: str | Path, reporter: Reporter | None = None) -> Network:
    """The arm trained through its stages on every image of the cohort (no test part), as
    scikit-learn's search refits its best estimator on all the data.

    Stages on source manifests are not run again: the backbone they made is read from the
    run directory's pretrained/ folder (made by `run_study` on the same recipe)."""
    configs = {a.name: a for a in recipe.arms}
    if arm not in configs:
        raise RecipeError(f"no model arm {arm!r}; arms: {sorted(configs)}")
    study = _Study(recipe, RunDir(Path(run_dir)), reporter or _Silent())
    everything = np.arange(study.cohort.n_images)
    net, _ = train_fold(configs[arm], study.pristine(configs[arm]), study.images, study.targets, everything,
                        recipe.seed, study.compute, study.cache, study.reporter)
    return net.cpu()


def run_study(recipe: Recipe, out_dir: str | Path, reporter: Reporter | None = None) -> StudyResult:
    """Run every unit on the same folds; resume from finished folds in `out_dir`.

    Nothing is written before the run has been checked against the directory: its lock is
    free, no foreign file would be overwritten, and finished folds there come from this very
    recipe and cohort. The error that stops a run is recorded in log.txt."""
    reporter = reporter or _Silent()
    run = RunDir(Path(out_dir))
    run.check_owned()
    run.lock()
    handler = logging.FileHandler(run.path / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return _run(recipe, run, reporter)
    except KeyboardInterrupt:
        log.error("interrupted; finished folds are kept and a rerun resumes from them")
        raise
    except Exception as err:
        log.error("the run stopped: %s: %s", type(err).__name__, err)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
        run.unlock()


def _run(recipe: Recipe, run: RunDir, reporter: Reporter) -> StudyResult:
    from stagewise.executors import open_executor

    t_start = time.perf_counter()
    cohort = check_study(recipe, source=recipe.name)  # every check before any training or writing
    for warning in cohort.warnings:
        log.warning("cohort: %s", warning)
    study = _Study(recipe, run, reporter, cohort)
    units = study_units(recipe)
    fingerprints = {u.name: unit_fingerprint(recipe, u.kind, u.arm, u.fraction, u.column, study.cohort_digest)
                    for u in units}
    run.check_folds({u.folder: fingerprints[u.name] for u in units})
    run.start(recipe)
    log.info("cohort %s: %d images, %d patients; %d splits; compute %s", Path(recipe.cohort.manifest).name,
             study.cohort.n_images, study.cohort.n_patients, len(study.splits), study.compute.label)
    reporter.start(len(units) * len(study.splits))
    results: dict[tuple[str, str], tuple[dict, pd.DataFrame]] = {}

    def finished(unit: Unit, split: Split, out: FoldOutput) -> None:
        results[unit.name, split.name] = record_fold(run, recipe, unit, split, fingerprints[unit.name], out, reporter)

    # The local executor fits each fold as it is submitted (the order of a plain loop); a
    # remote one runs them as tasks and hands each result back here as it finishes.
    with open_executor(study, finished, reporter) as executor:
        for unit in units:
            for split in study.splits:
                done = run.read_fold(unit.folder, split.name, fingerprints[unit.name])
                for message in run.damaged:
                    log.warning("damaged fold %s", message)
                run.damaged.clear()
                if done is not None:
                    results[unit.name, split.name] = done
                    reporter.fold_done(unit.name, split, done[0]["metrics"], resumed=True)
                else:
                    executor.submit(unit, split)
        executor.join()
    all_preds, units_out = [], {}
    for unit in units:
        fold_results = []
        for split in study.splits:
            meta, preds = results[unit.name, split.name]
            fold_results.append(meta)
            all_preds.append(preds)
        units_out[unit.name] = _unit_summary(unit, fold_results)
    metrics = {
        "recipe": recipe.name,
        "name": recipe.name,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": recipe.seed,
        "cohort": study.cohort.summary(),
        "protocol": recipe.protocol.model_dump(mode="json"),
        "n_splits": len(study.splits),
        "compute": study.compute.label,
        "arms": units_out,
        "wall_seconds_this_session": time.perf_counter() - t_start,
    }
    predictions = pd.concat(all_preds, ignore_index=True)
    metrics["evidence"] = compute_evidence(recipe, metrics, predictions)
    run.write_results(predictions, metrics)
    if recipe.evaluation.report:
        from stagewise.report.html import write_report

        write_report(run.path)
    return StudyResult(run.path, metrics, predictions)


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
        out |= {k: infos[0][k] for k in ("strategy", "bn_stats")}
        out["bytes_per_fold"] = float(np.mean([i["bytes_total"] for i in infos]))
        out["bytes_full_model_fedavg_per_fold"] = float(np.mean([i["bytes_full_model_fedavg"] for i in infos]))
        out["rounds"] = [{k: r[k] for k in ("round", "stage", "trainable", "bytes_down_per_site", "bytes_up",
                                            "sites_replied", "sites", "failures")} for r in infos[0]["rounds"]]
        out["rounds_with_missing_sites"] = sum(1 for i in infos for r in i["rounds"] if r["sites_replied"] < r["sites"])
    else:
        pairs = {(a, b) for i in infos for a, row in i["cross_site_auroc"].items() for b in row}
        out["cross_site_auroc"] = {}
        for a, b in sorted(pairs):
            vals = [i["cross_site_auroc"][a][b] for i in infos if b in i["cross_site_auroc"].get(a, {})]
            vals = [v for v in vals if v is not None and np.isfinite(v)]
            out["cross_site_auroc"].setdefault(a, {})[b] = float(np.mean(vals)) if vals else None
    return out


def _unit_summary(unit: Unit, fold_results: list[dict]) -> dict:
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
        out |= {"backbone": unit.arm.backbone.name, "stages": [s.kind for s in unit.arm.stages],
                "label_fraction": unit.fraction, "base_arm": unit.arm.name, "training": unit.arm.sites.mode}
        if unit.arm.sites.mode != "pooled":
            out["sites_training"] = _sites_training(fold_results)
        out["resources"] = _resources(fold_results)
        if unit.arm.tune is not None:
            out["tuning"] = [{"repeat": m["repeat"], "fold": m["fold"], "chosen": m["tuning"]["chosen"]} for m in fold_results]
        out["saliency"] = [s for m in fold_results for s in m.get("saliency", [])]
    elif unit.kind == "baseline":
        out |= {"backbone": f"score column {unit.column}", "stages": ["baseline"]}
    else:
        out |= {"backbone": "logistic regression on clinical columns", "stages": ["clinical"]}
    return out
