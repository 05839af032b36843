"""Experiment tracking in MLflow: one MLflow run per study, a nested run per unit and, under
it, one per fold.

Off unless the recipe has `tracking:` or MLFLOW_TRACKING_URI is set (`tracking: {mlflow:
false}` turns it off even then). The store is the recipe's `tracking.uri`, else
MLFLOW_TRACKING_URI, else a local store inside the run directory (`mlflow.db`, artifacts in
`mlartifacts/`; MLflow 3 keeps its plain-file store in maintenance mode and refuses it by
default, so the local store is MLflow's SQLite file). Everything is logged through
`MlflowClient` with explicit run ids: no global active run, nothing shared with other code
that uses MLflow in the same process.

What is logged, from the records the run directory keeps (so a fold read back on resume logs
exactly as a fold computed now): on the study run, the flattened resolved recipe as it may
leave the site (`shareable_recipe`: no local folders), each arm's backbone source and the
compute settings as parameters, every unit's summary as metrics, and metrics.json,
predictions.csv (without image paths and patient ids: the manifest row ties a prediction to
its image at the site), report.html and exported bundles as artifacts; on each fold run,
the fold's metrics, and per epoch the loss and every group's learning rate (step = epoch
counted over the unit's stages).

A resumed run continues the same MLflow run (its id is kept in `tracking.json` in the run
directory): a fold whose MLflow run finished is not logged again, one that was cut off is
logged anew, and folds finished while tracking was off are logged from their records.
A tracking server that cannot be reached stops the run before anything is written; one that
fails later only stops the tracking for this session (a warning in log.txt and on screen): the
study goes on, and the next resume logs what is missing. Every request to a server waits at
most `HTTP_TIMEOUT_S` seconds and is retried `HTTP_RETRIES` times (MLflow's own defaults, 120 s
and 7 retries with backoff, kept a study silent for minutes when a server stopped answering);
MLFLOW_HTTP_REQUEST_TIMEOUT / MLFLOW_HTTP_REQUEST_MAX_RETRIES set by the user win.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
import urllib.request
from pathlib import Path

import pandas as pd

from stagewise.version import __version__
from stagewise.recipe import Recipe, recipe_to_dict, shareable_backbone, shareable_recipe
from stagewise.errors import RunError
from stagewise.io import atomic_write

log = logging.getLogger("stagewise")

STATE_FILE = "tracking.json"
LOCAL_DB, LOCAL_ARTIFACTS = "mlflow.db", "mlartifacts"
STUDY_TAG, UNIT_TAG, FOLD_TAG = "stagewise.study", "stagewise.unit", "stagewise.fold"
SHARED_PREDICTION_COLUMNS_DROPPED = ("image", "patient")
HTTP_TIMEOUT_S, HTTP_RETRIES = 10, 1


@contextlib.contextmanager
def bounded_requests():
    """MLflow's HTTP requests within this block wait `HTTP_TIMEOUT_S` and retry `HTTP_RETRIES`
    times, unless the user's environment says otherwise (MLflow reads both at each request)."""
    ours = {k: str(v) for k, v in (("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S),
                                   ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES)) if k not in os.environ}
    os.environ.update(ours)
    try:
        yield
    finally:
        for k in ours:
            os.environ.pop(k, None)


def tracking_uri(recipe: Recipe, run_dir: Path) -> str | None:
    """Where this study is tracked, or None when tracking is off."""
    cfg, env = recipe.tracking, os.environ.get("MLFLOW_TRACKING_URI") or None
    if cfg is None:
        return env
    if not cfg.mlflow:
        return None
    return cfg.uri or env or f"sqlite:///{(Path(run_dir) / LOCAL_DB).resolve()}"


def _key(text: str) -> str:
    """An MLflow metric/param key: letters, digits and _ - . / only (arm names may hold +)."""
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", str(text))[:250]


def flatten(data, prefix: str = "") -> dict[str, str]:
    """Nested dicts and lists as dotted keys (`arms.0.stages.1.lr.head`) -> string values."""
    out: dict[str, str] = {}
    if isinstance(data, dict) and data:
        for k, v in data.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list) and data and any(isinstance(v, (dict, list)) for v in data):
        for i, v in enumerate(data):
            out |= flatten(v, f"{prefix}.{i}" if prefix else str(i))
    else:
        out[_key(prefix)] = (json.dumps(data) if isinstance(data, (list, dict)) else str(data))[:6000]
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fold_metrics(metrics: dict) -> dict[str, float]:
    """A fold's numeric metrics as MLflow keys (extra outcomes as `tasks.<t>.<m>`, sites as
    `sites.<s>.<m>`); undefined (NaN) ones are left out, as metrics.json writes them null."""
    out = {}
    for k, v in metrics.items():
        if _finite(v):
            out[_key(k)] = float(v)
        elif k in ("tasks", "sites") and isinstance(v, dict):
            for name, sub in v.items():
                out |= {_key(f"{k}.{name}.{m}"): float(x) for m, x in sub.items() if _finite(x)}
    return out


def _check_reachable(uri: str) -> None:
    """A tracking server must answer before the study starts (MLflow's own client would
    retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - the user's own tracking server
            r.read()
    except OSError as err:
        raise RunError(f"the MLflow tracking server {uri} does not answer ({url}: {getattr(err, 'reason', err)}); "
                       "start it, fix `tracking.uri` / MLFLOW_TRACKING_URI, or set `tracking: {mlflow: false}`") from None


class StudyTracker:
    """The MLflow runs of one study. Made with `open_tracker`; every method after `start` is
    a no-op once tracking is off or has failed in this session."""

    def __init__(self, recipe: Recipe, run_dir: Path, uri: str | None):
        self.recipe, self.run_dir, self.uri = recipe, Path(run_dir), uri
        self.client = None
        self.study_id: str | None = None
        self.experiment_id: str | None = None
        self.units: dict[str, str] = {}
        self.folds: dict[tuple[str, str], tuple[str, str]] = {}  # (unit, fold) -> (run id, status)
        self.notify = None
        """Called with the sentence that says tracking stopped (the study's screen), besides log.txt."""

    @property
    def on(self) -> bool:
        return self.client is not None

    # -- starting ---------------------------------------------------------------------
    def start(self, compute_label: str, n_threads: int | None = None) -> None:
        """Connect, create or continue the study's MLflow run, log its parameters."""
        if self.uri is None:
            return
        with bounded_requests():
            self._start(compute_label, n_threads)

    def _start(self, compute_label: str, n_threads: int | None) -> None:
        _check_reachable(self.uri)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        name = self.recipe.tracking.experiment if self.recipe.tracking and self.recipe.tracking.experiment else self.recipe.name
        try:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                local = self.uri.startswith("sqlite:///") and self.uri.endswith(LOCAL_DB)
                location = (self.run_dir / LOCAL_ARTIFACTS).resolve().as_uri() if local else None
                experiment_id = client.create_experiment(name, artifact_location=location)
            else:
                experiment_id = experiment.experiment_id
            self.client, self.experiment_id = client, experiment_id
            self.study_id = self._continue_or_create(experiment_id)
            self._log_params(self.study_id, self._study_params(compute_label, n_threads))
        except Exception as err:  # noqa: BLE001 - a tracking store that fails must not be a deep traceback
            self.client = None
            raise RunError(f"MLflow tracking at {self.uri} failed: {type(err).__name__}: {str(err)[:300]}") from None
        atomic_write(self.run_dir / STATE_FILE, json.dumps({"uri": self.uri, "experiment_id": experiment_id,
                                                            "run_id": self.study_id}, indent=1))
        log.info("tracking in MLflow: %s, experiment %s, run %s", self.uri, name, self.study_id)

    def _continue_or_create(self, experiment_id: str) -> str:
        state = {}
        try:
            state = json.loads((self.run_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            pass
        if state.get("uri") == self.uri and state.get("run_id"):
            try:
                run = self.client.get_run(state["run_id"])
                if run.info.lifecycle_stage == "active":
                    self.client.update_run(run.info.run_id, status="RUNNING")
                    self._read_children(experiment_id, run.info.run_id)
                    return run.info.run_id
            except Exception as err:  # noqa: BLE001 - deleted or unknown: a new run, said in the log
                log.warning("MLflow run %s of this run directory is gone (%s); starting a new one", state["run_id"], err)
        elif state.get("run_id"):
            log.warning("this run directory was tracked at %s before; tracking at %s starts a new MLflow run",
                        state.get("uri"), self.uri)
        run = self.client.create_run(experiment_id, run_name=self.recipe.name,
                                     tags={"stagewise.kind": "study", "stagewise.version": __version__})
        return run.info.run_id

    def _read_children(self, experiment_id: str, study_id: str) -> None:
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study_id}'",
                                       max_results=50000)
        for r in runs:
            tags = r.data.tags
            if FOLD_TAG in tags:
                self.folds[tags[UNIT_TAG], tags[FOLD_TAG]] = (r.info.run_id, r.info.status)
            elif UNIT_TAG in tags:
                self.units[tags[UNIT_TAG]] = r.info.run_id

    def _study_params(self, compute_label: str, n_threads: int | None) -> dict[str, str]:
        r = self.recipe
        params = flatten(shareable_recipe(recipe_to_dict(r)), "recipe")
        for arm in r.arms:
            b = arm.backbone
            params[_key(f"backbone.{arm.name}")] = shareable_backbone(b.name)
            params[_key(f"backbone.{arm.name}.source")] = b.name.split(":", 1)[0]
        params["compute.resolved"] = compute_label
        if n_threads:
            params["compute.torch_threads"] = str(n_threads)
        params["stagewise.version"] = __version__
        return params

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Parameters not yet on the run (a resumed run keeps the values it had: MLflow
        refuses to change one; a setting changed since, like the executor, is noted in the log)."""
        from mlflow.entities import Param

        have = self.client.get_run(run_id).data.params
        changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
        if changed:
            log.warning("MLflow run %s keeps its first values of %s", run_id, ", ".join(changed))
        new = [Param(k, v) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=new[i : i + 100])

    # -- logging ----------------------------------------------------------------------
    def _guarded(self, what: str, fn, *args) -> None:
        if not self.on:
            return
        try:
            with bounded_requests():
                fn(*args)
        except Exception as err:  # noqa: BLE001 - the study goes on; the next resume logs what is missing
            text = (f"MLflow tracking at {self.uri} stopped for this session ({what}: {type(err).__name__}: "
                    f"{str(err)[:300]}); the study goes on, and a rerun logs what is missing")
            log.warning("%s", text)
            self.client = None
            if self.notify is not None:
                self.notify(text)

    def _unit_run(self, unit) -> str:
        if unit.name not in self.units:
            run = self.client.create_run(self.experiment_id, run_name=unit.name, tags={
                "mlflow.parentRunId": self.study_id, STUDY_TAG: self.study_id, UNIT_TAG: unit.name,
                "stagewise.kind": unit.kind})
            self.units[unit.name] = run.info.run_id
            params = {"kind": unit.kind, "label_fraction": str(unit.fraction)}
            if unit.arm is not None:
                params |= {"backbone": shareable_backbone(unit.arm.backbone.name),
                           "stages": " -> ".join(s.kind for s in unit.arm.stages), "training": unit.arm.sites.mode}
            if unit.column:
                params["column"] = unit.column
            self._log_params(run.info.run_id, params)
        return self.units[unit.name]

    def fold(self, unit, split_name: str, meta: dict) -> None:
        """Log one finished fold (computed now or read back), unless its run finished before."""
        self._guarded(f"fold {unit.name} {split_name}", self._fold, unit, split_name, meta)

    def _fold(self, unit, split_name: str, meta: dict) -> None:
        from mlflow.entities import Metric, Param

        done = self.folds.get((unit.name, split_name))
        if done and done[1] == "FINISHED":
            return
        if done:  # cut off while logging: log it anew
            self.client.delete_run(done[0])
        parent = self._unit_run(unit)
        run = self.client.create_run(self.experiment_id, run_name=f"{unit.name} {split_name}", tags={
            "mlflow.parentRunId": parent, STUDY_TAG: self.study_id, UNIT_TAG: unit.name, FOLD_TAG: split_name})
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in fold_metrics(meta.get("metrics", {})).items()]
        if _finite(meta.get("seconds")):
            metrics.append(Metric("seconds", float(meta["seconds"]), now, 0))
        step = 0
        for i, stage in enumerate(meta.get("stages", [])):
            for entry in stage.get("epochs", []):
                if _finite(entry.get("loss")):
                    metrics.append(Metric("loss", float(entry["loss"]), now, step))
                for group_key in ("lr", "weight_decay"):
                    for group, value in (entry.get(group_key) or {}).items() if isinstance(entry.get(group_key), dict) else ():
                        if _finite(value):
                            metrics.append(Metric(_key(f"{group_key}.{group}"), float(value), now, step))
                metrics.append(Metric("stage", float(i), now, step))
                step += 1
        params = [Param(k, str(meta[k])) for k in ("repeat", "fold", "seed", "n_test_images", "n_train_images")
                  if k in meta]
        for j in range(0, max(len(metrics), 1), 1000):  # MLflow's batch limit
            self.client.log_batch(run.info.run_id, metrics=metrics[j : j + 1000], params=params if j == 0 else [])
        self.client.set_terminated(run.info.run_id, "FINISHED")
        self.folds[unit.name, split_name] = (run.info.run_id, "FINISHED")

    def finish(self, units: list, metrics: dict) -> None:
        """Summary metrics per unit and for the study, the run's files as artifacts; every
        run of the study marked finished."""
        self._guarded("summary", self._finish, units, metrics)

    def _finish(self, units: list, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        study_metrics = []
        evidence = metrics.get("evidence", {}).get("units", {})
        for unit in units:
            u = metrics["arms"][unit.name]
            values = {}
            for m, s in u.get("summary", {}).items():
                values |= {f"{m}_{k}": s[k] for k in ("mean", "sd") if _finite(s.get(k))}
            for m, ci in (evidence.get(unit.name, {}).get("bootstrap_ci") or {}).items():
                values |= {f"{m}_pooled": ci["point"]} if _finite(ci.get("point")) else {}
                values |= {f"{m}_pooled_{k}": ci[k] for k in ("low", "high") if _finite(ci.get(k))}
            run_id = self._unit_run(unit)
            self.client.log_batch(run_id, metrics=[Metric(_key(k), float(v), now, 0) for k, v in values.items()])
            self.client.set_terminated(run_id, "FINISHED")
            study_metrics += [Metric(_key(f"{unit.name}.{k}"), float(v), now, 0) for k, v in values.items()]
        if _finite(metrics.get("wall_seconds_this_session")):
            study_metrics.append(Metric("wall_seconds_this_session", float(metrics["wall_seconds_this_session"]), now, 0))
        for j in range(0, len(study_metrics), 1000):
            self.client.log_batch(self.study_id, metrics=study_metrics[j : j + 1000])
        for name in ("metrics.json", "report.html"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.study_id, str(self.run_dir / name))
        preds = self.run_dir / "predictions.csv"
        if preds.is_file():
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                shared = pd.read_csv(preds).drop(columns=list(SHARED_PREDICTION_COLUMNS_DROPPED), errors="ignore")
                shared.to_csv(Path(tmp) / "predictions.csv", index=False)
                self.client.log_artifact(self.study_id, str(Path(tmp) / "predictions.csv"))
        self.client.set_terminated(self.study_id, "FINISHED")

    def stop(self, status: str) -> None:
        """The study stopped early (FAILED, KILLED): its run says so; a rerun continues it."""
        self._guarded("stop", lambda: self.client.set_terminated(self.study_id, status))


def open_tracker(recipe: Recipe, run_dir: Path) -> StudyTracker:
    """The study's tracker (not yet connected: `start` does that, after the study's checks)."""
    return StudyTracker(recipe, run_dir, tracking_uri(recipe, run_dir))


def log_bundle(run_dir: str | Path, bundle: str | Path) -> bool:
    """Log an exported bundle as artifacts (`bundles/<folder>`) of the study's MLflow run, when
    the run directory is tracked; True when it was logged. A failure is a warning: the bundle
    itself is written."""
    try:
        state = json.loads((Path(run_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    try:
        _check_reachable(state["uri"])
        from mlflow.tracking import MlflowClient

        with bounded_requests():
            MlflowClient(tracking_uri=state["uri"]).log_artifacts(state["run_id"], str(bundle),
                                                                   artifact_path=f"bundles/{Path(bundle).name}")
    except Exception as err:  # noqa: BLE001
        log.warning("bundle not logged to MLflow (%s: %s)", type(err).__name__, str(err)[:300])
        return False
    return True
