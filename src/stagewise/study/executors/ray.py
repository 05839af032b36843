"""Run a study's fits as tasks on a Ray cluster (`compute.executor: ray`).

Each (unit, fold) fit is one task. The preprocessed images (one float16 array) go into the
object store once, so the tasks on a node share one copy; each arm's starting backbone
goes there once too: the named weights, or the result of the arm's stages on source
manifests, which run once as a task of their own (placed on this machine's node, where
the source manifests are) that the arm's fold tasks wait for. Nested-CV inner fits stay
inside their outer fold's task. A task returns everything it made, numbers, predictions,
logs and files (saved fold model, saliency PNGs) as bytes; only this process writes the
run directory, so workers need no shared filesystem. Finished folds are read back and not
submitted again, exactly as in a local run.

A task whose worker process or node dies is run again (`compute.max_retries`); a task that
raised an error stops the run with that error (the original stagewise exception, not a
Ray traceback; the worker's traceback is in the run's log.txt).

Determinism: a fold seeds itself from the recipe seed and its split, and the frozen-prefix
cache is exact, so a fold trained in a worker with the same number of torch threads on a
CPU gives the same bits as in a local run.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

import ray
import torch

from stagewise.errors import RunError
from stagewise.io import atomic_write
from stagewise.study.rundir import RunDir, pretrain_fingerprint
from stagewise.study.fitting import SilentReporter, fit_fold, study_from_state, study_state
from stagewise.training.cache import ImageSet, PrefixCache
from stagewise.training.compute import usable_cpus
from stagewise.quiet import warnings_to_log

log = logging.getLogger("stagewise")

CRASH_FOR_TEST = "STAGEWISE_RAY_TEST_CRASH"
"""Tests only: a folder; a file named `<unit folder>.<split>` (or `<arm>.pretrain`) there
makes the worker running that fit exit abruptly after its first epoch, once (the file is
removed), as if its process had been killed; Ray then runs the task again."""


# -- in the worker --------------------------------------------------------------------------

_cache: PrefixCache | None = None


def _process_cache() -> PrefixCache:
    """One frozen-prefix cache per worker process, reused by the fits it runs (exact, so a
    fold's numbers do not depend on what ran before in the process)."""
    global _cache
    if _cache is None:
        _cache = PrefixCache()
    return _cache


class _WorkerReporter(SilentReporter):
    def __init__(self, label: str):
        self.label, self.epochs = label, 0

    def epoch_done(self, stage, epoch, entry):
        self.epochs += 1
        if self.epochs == 1:
            _crash_for_test(self.label)


def _crash_for_test(label: str) -> None:
    folder = os.environ.get(CRASH_FOR_TEST)
    if not folder:
        return
    try:
        (Path(folder) / label).unlink()
    except FileNotFoundError:
        return
    os._exit(1)


def _image_set(x, key: str | None) -> ImageSet | None:
    if x is None:
        return None
    with warnings.catch_warnings():  # shared read-only memory of the object store; never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return ImageSet(torch.from_numpy(x), key)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path; safetensors before json, as a local run
    writes them (a pretrained backbone counts as present once its .safetensors exists)."""
    paths = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: (p.suffix == ".json", str(p)))
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in paths}


def _where(threads: int, compute_label: str) -> dict:
    return {"kind": "ray", "node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()[:12],
            "pid": os.getpid(), "threads": threads, "compute": compute_label}


@ray.remote
def _fit_task(state: dict, x, key: str | None, backbone, unit, split, threads: int):
    """One (unit, fold) fit in a private folder; returns its FoldOutput with the files."""
    from stagewise.study.fitting import FoldOutput  # noqa: F401 - unpickled on the driver

    with tempfile.TemporaryDirectory(prefix="stagewise-fit-") as scratch:
        pristine = {} if backbone is None else {unit.arm.name: backbone}
        study = study_from_state(state, RunDir(Path(scratch)), _image_set(x, key), pristine, _process_cache(),
                                 _WorkerReporter(f"{unit.folder}.{split.name}"))
        torch.set_num_threads(threads)
        out = fit_fold(study, unit, split)
        out.files = _files(Path(scratch))
    out.extra["executor"] = _where(threads, study.compute.label)
    return out


@ray.remote(num_returns=2)
def _pretrain_task(state: dict, arm, threads: int):
    """An arm's stages on source manifests: (pretrained/ files as bytes, the backbone)."""
    with tempfile.TemporaryDirectory(prefix="stagewise-pretrain-") as scratch:
        study = study_from_state(state, RunDir(Path(scratch)), None, {}, None, _WorkerReporter(f"{arm.name}.pretrain"))
        torch.set_num_threads(threads)
        backbone = study.pristine(arm)
        return _files(Path(scratch)), backbone


# -- in the driver --------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _error_text(trace: str) -> str:
    """`Class: message` (with the message's further lines) at the end of a traceback's text."""
    lines = trace.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[A-Za-z_][\w.]*: ", lines[i]):
            name, message = lines[i].split(": ", 1)
            return "\n".join([f"{name.rsplit('.', 1)[-1]}: {message}", *lines[i + 1:]])
    return lines[-1] if lines else "unknown error"


class RayExecutor:
    """Submits fits as Ray tasks, hands results to `on_done` as they finish (ray.wait)."""

    def __init__(self, study, on_done, reporter):
        self.study, self.on_done, self.reporter = study, on_done, reporter
        self.cfg = study.recipe.compute
        self.cpus = self.cfg.cpus_per_task or (self.cfg.threads if isinstance(self.cfg.threads, int) else 1)
        self.gpus = 0.0
        self.submitted = 0
        """Fit tasks submitted (pretraining not counted)."""
        self._pending: dict = {}
        self._backbones: dict = {}
        self._images = None
        self._image_key: str | None = None
        self._state = None
        self._driver_node: str | None = None
        self._connected_here = False

    # -- lifecycle --

    def __enter__(self) -> "RayExecutor":
        federated = [a.name for a in self.study.recipe.arms
                     if getattr(getattr(a, "sites", None), "mode", None) == "federated"]
        if federated:  # Flower starts (and at its end shuts down) its own Ray: that cannot run inside a Ray task
            raise RunError(f"arm(s) {federated} are federated: Flower runs them in a Ray simulation of its own, which "
                           "cannot run inside a Ray task. Run this recipe with executor: local.")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not ray.is_initialized():  # else: the caller's own connection is used as it is
            self._connect()
        try:
            self._plan()
            self._state = ray.put(study_state(self.study))
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def _connect(self) -> None:
        address = self.cfg.address
        options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        with warnings.catch_warnings():
            warnings.showwarning = warnings_to_log(warnings.showwarning)  # Ray's FutureWarnings: log.txt, not the screen
            try:
                if address:
                    ray.init(address=address, **options)
                else:  # "local": a new instance even if `ray start` left one on this machine
                    ray.init(address="local", num_cpus=usable_cpus(), **options)
            except ConnectionError as err:
                raise RunError(
                    f"compute.address {address}: no Ray cluster to join ({_first_line(err)}). Start one with "
                    "`ray start --head`, or give no address to start Ray on this machine for the run."
                ) from None
        self._connected_here = True

    def _close(self) -> None:
        for ref in list(self._pending):  # an error or Ctrl-C: the cluster stops these fits too
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - finished or already gone
                pass
        self._pending.clear()
        if self._connected_here:
            ray.shutdown()
            self._connected_here = False

    def _say(self, text: str) -> None:
        log.info(text)
        message = getattr(self.reporter, "message", None)
        if callable(message):
            message(text)

    def _plan(self) -> None:
        """Resources per task; how many run at once, and where."""
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        total_gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
        if self.cfg.device == "cuda" and not total_gpus:
            raise RunError("compute.device is cuda but the Ray cluster has no GPU; use device: auto or cpu")
        if self.cfg.gpus_per_task is not None:
            self.gpus = float(self.cfg.gpus_per_task)
        else:
            self.gpus = 1.0 if total_gpus and self.cfg.device != "cpu" else 0.0
        try:
            self._driver_node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - a driver outside the cluster: pretraining goes anywhere
            self._driver_node = None
        at_once, where = 0, []
        for n in nodes:
            cpus, gpus = n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)
            k = int(cpus // self.cpus)
            if self.gpus:
                k = min(k, int(gpus // self.gpus + 1e-9))
            at_once += k
            where.append(f"{n['NodeManagerAddress']} runs {k} ({cpus:g} CPU{f', {gpus:g} GPU' if gpus else ''})")
        per_task = f"{self.cpus} CPU{'s' if self.cpus > 1 else ''}{f' + {self.gpus:g} GPU' if self.gpus else ''}"
        self._say(f"ray: {at_once} fit(s) at once, {per_task} and {self.cpus} torch thread(s) each, "
                  f"on {len(nodes)} node(s): {', '.join(where)}")
        if not at_once:
            self._say(f"ray: no node has {per_task} free for one fit; the fits wait until such a node joins "
                      "(lower compute.cpus_per_task / gpus_per_task, or add a node)")

    # -- submitting --

    def _image_ref(self):
        if self._images is None:
            images = self.study.images  # loaded (and checked) here, once
            self._images, self._image_key = ray.put(images.x.numpy()), images.key
        return self._images

    def _backbone_ref(self, arm):
        """The arm's starting backbone in the object store: the named weights, or the
        pretrained backbone (read back from pretrained/, or made by a pretraining task)."""
        if arm.name in self._backbones:
            return self._backbones[arm.name]
        path = self.study.run.pretrained_path(arm.name, pretrain_fingerprint(self.study.recipe, arm))
        if any(s.external for s in arm.stages) and not _intact(path):
            strategy = "DEFAULT"
            if self._driver_node is not None:  # the source manifests are on this machine
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                strategy = NodeAffinitySchedulingStrategy(self._driver_node, soft=True)
            files, backbone = _pretrain_task.options(
                num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.cfg.max_retries, retry_exceptions=False,
                scheduling_strategy=strategy, name=f"stagewise {arm.name} pretrain",
            ).remote(self._state, arm, self.cpus)
            self._pending[files] = ("pretrain", arm, None)
            log.info("ray: %s: stages on source manifests run once, as a task; its folds wait for it", arm.name)
        else:
            backbone = ray.put(self.study.pristine(arm))
        self._backbones[arm.name] = backbone
        return backbone

    def submit(self, unit, split) -> None:
        if unit.kind == "model":
            x, backbone = self._image_ref(), self._backbone_ref(unit.arm)
            cpus, gpus, threads = self.cpus, self.gpus, self.cpus
        else:  # a baseline score or the clinical model: a small scikit-learn fit
            x, backbone, cpus, gpus, threads = None, None, 1, 0, 1
        ref = _fit_task.options(
            num_cpus=cpus, num_gpus=gpus, max_retries=self.cfg.max_retries, retry_exceptions=False,
            name=f"stagewise {unit.name} {split.name}",
        ).remote(self._state, x, self._image_key if x is not None else None, backbone, unit, split, threads)
        self._pending[ref] = ("fit", unit, split)
        self.submitted += 1

    # -- results --

    def join(self) -> None:
        while self._pending:
            ready, _ = ray.wait(list(self._pending), num_returns=1)
            kind, a, b = self._pending.pop(ready[0])
            label = f"{a.name} pretraining" if kind == "pretrain" else f"{a.name} {b.name}"
            value = result(ready[0], label, self.cfg.max_retries)
            if kind == "pretrain":
                self._write_pretrained(value)
            else:
                self.on_done(a, b, value)

    def _write_pretrained(self, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            path = self.study.run.path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)


def result(ref, label: str, max_retries: int = 0):
    """The value of a task; its failure as the fit's own exception (a CohortError stays a
    CohortError), or as a RunError naming the fit when the worker or its node was lost."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        log.error("%s failed in a Ray worker:\n%s", label, err)
        cause = err.cause
        if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
            raise cause from None  # the fit's own error (CohortError, FloatingPointError, ...)
        raise RunError(f"{label} failed in a Ray worker: {_first_line(cause or err)}") from None
    except ray.exceptions.UnserializableException as err:  # an error that does not pickle: its text
        log.error("%s failed in a Ray worker:\n%s", label, err)
        raise RunError(f"{label} failed in a Ray worker: {_error_text(err._original_stack_trace)}") from None
    except ray.exceptions.RayError as err:
        log.error("%s did not complete on the Ray cluster: %s", label, err)
        raise RunError(
            f"{label} did not complete on the Ray cluster ({type(err).__name__}, after up to {max_retries} "
            f"retries): {_first_line(err)}"
        ) from None


def _intact(path: Path) -> bool:
    """A pretrained backbone to read back; a damaged one is set aside (then made again), as
    `Study._pretrained` does in a local run."""
    if not path.is_file():
        return False
    from safetensors.torch import load_file

    try:
        load_file(str(path))
        return True
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        log.warning("pretrained backbone %s is damaged (%s: %s); set aside and made again",
                    path.name, type(err).__name__, str(err)[:120])
        os.replace(path, path.with_name(path.name + ".damaged"))
        return False
