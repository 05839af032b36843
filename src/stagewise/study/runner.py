"""Run a study: recipe -> cohort -> splits -> (per unit and fold: fit -> predictions) ->
metrics -> evidence -> report. Every unit runs on exactly the same folds.

A *unit* is one column of results: a model arm (possibly at a fraction of the training
labels), a baseline score column, or the clinical-only model.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from stagewise.study.preflight import check_study
from stagewise.evaluation.evidence import compute_evidence
from stagewise.evaluation.splits import Split
from stagewise.study.executors import open_executor
from stagewise.evaluation.splits import fold_seed
from stagewise.evaluation.thresholds import UNRELIABLE_SENTENCE
from stagewise.study.fitting import FoldOutput, Reporter, Study
from stagewise.study.progress import LineReporter, Phases, fmt_fold_metrics, unit_stages
from stagewise.recipe import Recipe
from stagewise.data.fingerprint import cohort_digest
from stagewise.errors import RunError
from stagewise.io import atomic_write
from stagewise.quiet import warnings_to_log
from stagewise.study.rundir import RunDir, unit_fingerprint
from stagewise.study.tracking import StudyTracker, open_tracker
from stagewise.training.compute import busy_machine_note
from stagewise.study.summaries import mixed_units, run_compute, unit_summary
from stagewise.study.units import Unit, study_units

log = logging.getLogger("stagewise")


@dataclass
class StudyResult:
    run_dir: Path
    metrics: dict
    predictions: pd.DataFrame


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
    log.info("%s %s: %s", unit.name, split.name, fmt_fold_metrics(out.metrics))
    if out.metrics.get("threshold_unreliable"):
        log.warning("%s %s: training AUROC %.4f: %s", unit.name, split.name, out.metrics["train_auroc"],
                    UNRELIABLE_SENTENCE)
    reporter.fold_done(unit.name, split, out.metrics, resumed=False)
    return meta, preds


def warn_unreliable_thresholds(units_out: dict, reporter: Reporter) -> list[str]:
    """Once for the run, in log.txt and on screen: the units whose thresholds were chosen on
    training scores that separate (almost) perfectly (resumed folds included). Returns them."""
    units = [name for name, u in units_out.items()
             if any(f.get("threshold_unreliable") for f in u.get("folds", []))]
    if units:
        text = f"{', '.join(units)}: {UNRELIABLE_SENTENCE}"
        log.warning("threshold: %s", text)
        say = getattr(reporter, "message", None)
        if say is not None:
            say(text)
    return units


class RunLog(logging.FileHandler):
    """log.txt of a run. A write that fails (a full disk) is said once on stderr, not as one
    logging traceback per line; the error that stops the run is still shown by the caller."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):  # not the disk: logging's own report of a bad record
            super().handleError(record)
        elif not self.failed:
            self.failed = True
            print(f"[stagewise] cannot write {self.baseFilename}: {getattr(err, 'strerror', None) or err}; "
                  "the log lines from here on are not kept", file=sys.stderr, flush=True)


def report_damaged(run: RunDir, reporter: Reporter) -> None:
    """Name the folds found damaged (and set aside) in log.txt and on screen."""
    say = getattr(reporter, "message", None)
    for message in run.damaged:
        log.warning("damaged fold %s", message)
        if say is not None:
            say(f"damaged fold {message}")
    run.damaged.clear()


def run_study(recipe: Recipe, out_dir: str | Path, reporter: Reporter | None = None) -> StudyResult:
    """Run every unit on the same folds; resume from finished folds in `out_dir`. Without a
    `reporter`, progress goes to stderr as plain lines (`stagewise.study.progress.LineReporter`);
    pass `SilentReporter()` for none.

    Nothing is written before the run has been checked against the directory: its lock is
    free, no foreign file would be overwritten, and finished folds there come from this very
    recipe and cohort. The error that stops a run is recorded in log.txt."""
    reporter = reporter or LineReporter()  # from Python or a notebook: plain progress lines on stderr
    run = RunDir(Path(out_dir))
    run.check_owned()
    run.lock()
    try:
        handler = RunLog(run.path / "log.txt")
    except OSError as err:
        run.unlock()
        raise RunError(f"cannot write {run.path / 'log.txt'}: {err.strerror or err}. Free space or choose another "
                       "output directory.") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    tracker = open_tracker(recipe, run.path)  # connects only after the study's checks
    tracker.notify = getattr(reporter, "message", None)  # a tracking failure is said on screen too
    threads = torch.get_num_threads()  # `threads: auto` changes the process's count for the run only
    try:
        with warnings.catch_warnings():
            warnings.showwarning = warnings_to_log(warnings.showwarning)  # library noise: log.txt only
            return _run(recipe, run, reporter, tracker)
    except KeyboardInterrupt:
        log.error("interrupted; finished folds are kept and a rerun resumes from them")
        tracker.stop("KILLED")
        raise
    except Exception as err:
        log.error("the run stopped: %s: %s", type(err).__name__, err)
        tracker.stop("FAILED")
        raise
    finally:
        if recipe.compute.threads == "auto":
            torch.set_num_threads(threads)
        log.removeHandler(handler)
        handler.close()
        run.unlock()


def speed_note(recipe: Recipe, say) -> None:
    """A recipe with a fixed thread count on a machine where other work holds CPUs: the
    advice goes to log.txt and to the screen (`say`), where a person can act on it."""
    if recipe.compute.executor == "local" and recipe.compute.threads != "auto" and (
            busy := busy_machine_note(recipe.compute.threads)):
        log.warning("compute: %s", busy)
        if say is not None:
            say(f"note: {busy}")


def evidence_and_report(recipe: Recipe, run: RunDir, study: Study, metrics: dict, predictions: pd.DataFrame,
                        say) -> None:
    """After training: statistics (bootstrap, curves, comparisons), metrics.json and the
    report, each step said as it starts (`say`, else log.txt) and timed at the end."""
    phases = Phases(say or log.info)
    metrics["evidence"] = compute_evidence(recipe, metrics, predictions, study.cohort.groups, phases.step)
    phases.step("writing metrics.json and predictions.csv")
    run.write_results(predictions, metrics)
    if recipe.evaluation.report:
        from stagewise.report.html import write_report

        phases.step("report", "figures and report.html")
        write_report(run.path)
    phases.finish("statistics and report done")


def _run(recipe: Recipe, run: RunDir, reporter: Reporter, tracker: StudyTracker) -> StudyResult:
    t_start = time.perf_counter()
    cohort = check_study(recipe, source=recipe.name)  # every check before any training or writing
    for warning in cohort.warnings:
        log.warning("cohort: %s", warning)
    say = getattr(reporter, "message", None)  # optional: one-line notes on screen
    speed_note(recipe, say)
    study = Study(recipe, run, reporter, cohort)
    units = study_units(recipe)
    # the cohort's content (rows, labels, patients, image bytes) is part of every fold's fingerprint
    digest = cohort_digest(cohort.table, [c for c in cohort.table.columns if c != "path"])
    fingerprints = {u.name: unit_fingerprint(recipe, u.kind, u.arm, u.fraction, u.column, digest) for u in units}
    run.check_folds({u.folder: fingerprints[u.name] for u in units}, recipe)
    model_arms = [u.arm for u in units if u.kind == "model"]
    if model_arms:
        study.check_threads(model_arms[0])  # `threads: auto` before the precision is timed under them
    compute = study.compute_label(model_arms)  # `auto`: measured here
    threads = torch.get_num_threads() if recipe.compute.threads == "auto" else recipe.compute.threads
    tracker.start(compute, threads)  # an unreachable server stops here, nothing written
    run.start(recipe, {"compute_choice": study.compute_choices} if study.compute_choices else {})
    log.info("cohort %s: %d images, %d patients; %d splits; compute %s", Path(recipe.cohort.manifest).name,
             study.cohort.n_images, study.cohort.n_patients, len(study.splits), compute)
    reporter.start(len(units) * len(study.splits))
    plan = getattr(reporter, "plan", None)  # optional, like `message`: which units train (counted, timed)
    if plan is not None:
        plan([u.name for u in units if u.kind == "model"], len(study.splits), *unit_stages(units))
    results: dict[tuple[str, str], tuple[dict, pd.DataFrame]] = {}

    def finished(unit: Unit, split: Split, out: FoldOutput) -> None:
        results[unit.name, split.name] = record_fold(run, recipe, unit, split, fingerprints[unit.name], out, reporter)
        tracker.fold(unit, split.name, results[unit.name, split.name][0])

    # The local executor fits each fold as it is submitted (the order of a plain loop); a
    # remote one runs them as tasks and hands each result back here as it finishes.
    with open_executor(study, finished, reporter) as executor:
        for unit in units:
            for split in study.splits:
                done = run.read_fold(unit.folder, split.name, fingerprints[unit.name])
                report_damaged(run, reporter)
                if done is not None:
                    results[unit.name, split.name] = done
                    reporter.fold_done(unit.name, split, done[0]["metrics"], resumed=True)
                    tracker.fold(unit, split.name, done[0])  # logged once: skipped if its MLflow run finished
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
        units_out[unit.name] = unit_summary(unit, fold_results)
    warn_unreliable_thresholds(units_out, reporter)
    compute, fold_compute = run_compute(units_out, compute)  # what the folds ran with, resumed ones included
    for name, settings in mixed_units(units_out).items():
        log.warning("compute: the folds of %s ran under different settings (%s): their timings are not comparable",
                    name, settings)
    metrics = {
        "recipe": recipe.name,
        "name": recipe.name,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": recipe.seed,
        "cohort": study.cohort.summary(),
        "protocol": recipe.protocol.model_dump(mode="json"),
        "n_splits": len(study.splits),
        "compute": compute,
        "compute_folds": fold_compute,
        "compute_choice": study.compute_choices,
        "thread_choices": study.thread_choices,
        "arms": units_out,
        "wall_seconds_this_session": time.perf_counter() - t_start,
    }
    predictions = pd.concat(all_preds, ignore_index=True)
    evidence_and_report(recipe, run, study, metrics, predictions, say)
    tracker.finish(units, metrics)
    return StudyResult(run.path, metrics, predictions)
