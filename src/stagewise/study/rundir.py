"""The run directory: resolved recipe, versions, per-fold results, predictions, metrics, log.

Every fold is written atomically as soon as it finishes, with a hash of everything that
determines its numbers (recipe *and* cohort content) and a checksum of its predictions.
Running the same recipe again reads finished folds back instead of recomputing them; a
fold made by a different recipe or different data is never silently mixed in, and a
damaged fold is named and recomputed. One writer at a time holds the directory's lock, and
nothing is written into a directory before the run has been checked against it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from stagewise.version import __version__
from stagewise.data.fingerprint import arm_inputs_digest
from stagewise.errors import RunError
from stagewise.io import atomic_write, check_writable, strict_json
from stagewise.recipe import REPORT_ONLY_FIELDS, ArmConfig, Recipe, recipe_to_dict


MARKER = ".stagewise-run"
"""Written into every run directory: a directory without it holds no file stagewise may overwrite."""
OWN_FILES = ("recipe.yaml", "environment.json", "predictions.csv", "metrics.json", "report.html", "log.txt")


FINGERPRINTED = ("seed", "cohort.", "data.", "protocol.", "compute.device", "compute.precision",
                 "compute.channels_last", "evaluation.recalibrate")
"""Recipe keys (prefixes) that enter `unit_fingerprint` besides the unit's own arm."""
NOT_FINGERPRINTED = tuple(f"cohort.{f}" for f in REPORT_ONLY_FIELDS)
"""Keys under those prefixes (and the keys below them) that change only what the report shows
(the outcome's wording, the subgroups): they decide no number."""


def _report_only(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NOT_FINGERPRINTED)


def _flat_settings(value, prefix: str = "", out: dict | None = None) -> dict:
    """A recipe dict as {dotted key: value}: lists of named items by name (`arms[probe]`),
    other lists of dicts by index (`stages.0`)."""
    out = {} if out is None else out
    if isinstance(value, dict):
        for k, v in value.items():
            _flat_settings(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        for v in value:
            _flat_settings(v, f"{prefix}[{v['name']}]", out)
    elif isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        for i, v in enumerate(value):
            _flat_settings(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = value
    return out


def recipe_differences(old: dict, new: dict, keys: tuple[str, ...] = (), limit: int = 8) -> tuple[list[str], bool]:
    """The settings that differ between two recipe dicts, as 'key (run: old, now: new)' with
    dotted keys (arms by name: `arms[probe].stages.0.lr`), at most `limit` of them; with
    `keys`, only keys starting with one of them (`protocol.label_fractions` never counts:
    adding a fraction keeps the finished arms, nor do the outcome's wording and the subgroups). Second: whether one of them is a setting the
    old recipe lacks inside an object it has (a field a later stagewise added, not a stage or
    arm the user added)."""
    a, b = _flat_settings(old), _flat_settings(new)
    absent = object()
    show = lambda v: "not set" if v is absent else json.dumps(v)  # noqa: E731
    wanted = lambda k: ((not keys or k.startswith(keys)) and not k.startswith("protocol.label_fractions")  # noqa: E731
                        and not _report_only(k))
    changed = [k for k in sorted(set(a) | set(b)) if wanted(k) and a.get(k, absent) != b.get(k, absent)]

    def added_field(k: str) -> bool:
        parts = k.split(".")
        for depth in range(len(parts) - 1, 0, -1):  # the nearest enclosing object the old recipe has
            if any(x.startswith(".".join(parts[:depth]) + ".") for x in a):
                return not parts[depth].isdigit()  # a new list item is the user's; a new key is the schema's
        return False

    diffs = [f"{k} (run: {show(a.get(k, absent))}, now: {show(b.get(k, absent))})" for k in changed]
    newer = any(k not in a and added_field(k) for k in changed)
    return diffs[:limit] + ([f"and {len(diffs) - limit} more"] if len(diffs) > limit else []), newer


NEWER_DEFAULTS = {"sites": {"local_groups": [], "privacy": None, "cross_site_evaluation": False, "secure_aggregation": None,
                            "lr_schedule": "each_round"},
                  "stage": {"site_local": False}}
"""Arm fields added after runs were made, left out of a fingerprint while at their default:
a run made before them resumes, one that sets them makes new folds."""


def arm_dump(arm: ArmConfig) -> dict:
    """The arm as a fingerprint sees it (without `NEWER_DEFAULTS` at their default)."""
    d = arm.model_dump(mode="json")
    for k, v in NEWER_DEFAULTS["sites"].items():
        if d["sites"].get(k, v) == v:
            d["sites"].pop(k, None)
    for stage in d["stages"]:
        for k, v in NEWER_DEFAULTS["stage"].items():
            if stage.get(k, v) == v:
                stage.pop(k, None)
    return d


def unit_fingerprint(recipe: Recipe, kind: str, arm: ArmConfig | None, fraction: float, column: str | None,
                     cohort: str = "") -> str:
    """Hash of what decides a unit's fold results: cohort settings and content (`cohort`, a
    `cohort_digest`), data, protocol, seed, precision and the unit itself (arm and label
    fraction, baseline column, or clinical columns); for model units also
    `evaluation.recalibrate` when set, since its fit needs the training predictions, and the
    content of the files the arm reads besides the cohort (`arm_inputs_digest`: weights
    files, source manifests and their images), only for arms that read any: the fingerprints
    of other arms stay those of earlier runs."""
    protocol = recipe.protocol.model_dump(mode="json")
    protocol.pop("label_fractions")  # adding a fraction must not invalidate finished arms
    relevant = {
        "seed": recipe.seed,
        "cohort": recipe.cohort.model_dump(mode="json", exclude=set(REPORT_ONLY_FIELDS)),  # they decide no number
        "cohort_content": cohort,
        "protocol": protocol,
        "kind": kind,
    }
    if kind == "model":
        relevant |= {
            "data": recipe.data.model_dump(mode="json"),
            "precision": [recipe.compute.device, recipe.compute.precision, recipe.compute.channels_last],
            "arm": arm_dump(arm),
            "fraction": fraction,
        }
        if recipe.evaluation.recalibrate != "none":  # fitted on training predictions, which folds do not keep
            relevant["recalibrate"] = recipe.evaluation.recalibrate
        if (inputs := arm_inputs_digest(arm)) is not None:
            relevant["inputs"] = inputs
    else:
        relevant["column"] = column
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_fingerprint(recipe: Recipe, arm: ArmConfig) -> str:
    """Hash of what decides an arm's pretrained backbone: its backbone, data size, seed and
    the stages on source manifests, and the content of the files they read (weights files,
    source manifests and their images)."""
    relevant = {
        "seed": recipe.seed,
        "data": recipe.data.model_dump(mode="json"),
        "precision": [recipe.compute.device, recipe.compute.precision, recipe.compute.channels_last],
        "backbone": arm.backbone.model_dump(mode="json"),
        "stages": [s.model_dump(mode="json") for s in arm.stages if s.external],
    }
    if (inputs := arm_inputs_digest(arm)) is not None:
        relevant["inputs"] = inputs
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def environment() -> dict:
    import sklearn
    import timm
    import torch
    import torchvision

    return {
        "stagewise": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads_this_session": torch.get_num_threads(),  # each fold's own: metrics.json arms[unit].compute
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


@dataclass
class RunDir:
    path: Path
    damaged: list[str] = field(default_factory=list)
    """Fold files found damaged and set aside for recomputation, for the log."""

    def __post_init__(self):
        self.path = Path(self.path)
        self._lock = None

    @property
    def folds_dir(self) -> Path:
        return self.path / "folds"

    # -- ownership -----------------------------------------------------------------------

    def check_owned(self) -> None:
        """Refuse a directory holding files of the run's names that a run did not write
        (e.g. `-o .` next to a hand-written recipe.yaml)."""
        if not self.path.is_dir() or (self.path / MARKER).is_file() or self._legacy_run():
            return
        foreign = [n for n in OWN_FILES if (self.path / n).exists()]
        if foreign:
            raise RunError(
                f"{self.path} holds {', '.join(foreign)} that no stagewise run wrote there; a run would overwrite "
                "them. Choose a new or empty output directory (-o DIR)."
            )

    def _legacy_run(self) -> bool:
        """A run directory made before the marker existed: its environment.json is ours."""
        try:
            return "stagewise" in json.loads((self.path / "environment.json").read_text())
        except (OSError, ValueError, TypeError):
            return False

    def lock(self) -> None:
        """Take the directory's exclusive lock; a second writer is refused with the holder's PID."""
        from filelock import FileLock, Timeout

        check_writable(self.path)
        lock = FileLock(str(self.path / ".lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = self._owner()
            raise RunError(
                f"{self.path} is in use by another stagewise run ({holder}). Wait for it to finish, or choose "
                "another output directory."
            ) from None
        self._lock = lock
        atomic_write(self.path / MARKER, json.dumps({"stagewise": __version__}))
        atomic_write(self.path / ".owner.json", json.dumps({"pid": os.getpid(), "host": platform.node(),
                                                              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))

    def _owner(self) -> str:
        try:
            o = json.loads((self.path / ".owner.json").read_text())
            return f"PID {o['pid']} on {o['host']}, since {o['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "PID unknown"

    def unlock(self) -> None:
        if self._lock is not None:
            (self.path / ".owner.json").unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    # -- writing -------------------------------------------------------------------------

    def check_folds(self, expected: dict[str, str], recipe: Recipe | None = None) -> None:
        """Refuse before writing anything when a unit's finished folds were made by another
        recipe or other data. `expected` maps unit folder -> fingerprint. With `recipe`, the
        refusal names the settings that differ from the run's recipe.yaml (its last start)."""
        changed = []
        for folder, fingerprint in expected.items():
            for meta_path in sorted((self.folds_dir / folder).glob("*.json")):
                meta = self._read_meta(meta_path)
                if meta is not None and meta.get("fingerprint") != fingerprint:
                    changed.append(folder)
                    break
        if not changed:
            return
        what = ("a different recipe or different data (cohort rows, labels or images, data, protocol, seed, "
                "precision or the arm itself changed)")
        stored = self._stored_recipe()
        if recipe is not None and stored is not None:
            arms = {a.name for a in recipe.arms if any(c == a.name or c.startswith(f"{a.name}@") for c in changed)}
            diffs, newer = recipe_differences(stored, recipe_to_dict(recipe),
                                              FINGERPRINTED + tuple(f"arms[{a}]." for a in arms))
            if newer:
                what = (f"an earlier stagewise, whose recipes lack settings this one has: {'; '.join(diffs)}. "
                        f"This version cannot continue its finished folds (stagewise {__version__})")
            elif diffs:
                what = (f"a different recipe: {'; '.join(diffs)}. To continue the finished folds, give these "
                        "settings the run's values again (e.g. `--set key=value`)")
            else:
                what = ("the same recipe as its recipe.yaml but different data: the cohort's rows, labels, patients "
                        "or image files, or a file an arm reads (its backbone's weights file, a source manifest or "
                        "its images) changed")
        raise RunError(
            f"{self.path}: unit(s) {changed} were run with {what}. Nothing was written. "
            f"Choose a new output directory, or delete {', '.join(str(self.folds_dir / c) for c in changed)} "
            "to recompute."
        )

    def _stored_recipe(self) -> dict | None:
        try:
            stored = yaml.safe_load((self.path / "recipe.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return None
        return stored if isinstance(stored, dict) else None

    def start(self, recipe: Recipe, facts: dict | None = None) -> None:
        """Write the recipe and environment.json (this machine, libraries, seed, and `facts`
        of this run such as how compute settings were chosen)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.folds_dir.mkdir(exist_ok=True)
        atomic_write(self.path / "recipe.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        env = environment() | {"seed": recipe.seed} | (facts or {})
        atomic_write(self.path / "environment.json", json.dumps(env, indent=2))

    def pretrained_path(self, arm: str, fingerprint: str) -> Path:
        return self.path / "pretrained" / f"{arm}-{fingerprint}.safetensors"

    def _fold_paths(self, arm: str, split_name: str) -> tuple[Path, Path]:
        d = self.folds_dir / arm
        return d / f"{split_name}.json", d / f"{split_name}.csv"

    def _read_meta(self, meta_path: Path) -> dict | None:
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def read_fold(self, arm: str, split_name: str, fingerprint: str) -> tuple[dict, pd.DataFrame] | None:
        """A finished, intact fold of this arm, or None (not run yet, or damaged: then its
        files are moved aside and named in `damaged`); a fold of another recipe is an error."""
        meta_path, pred_path = self._fold_paths(arm, split_name)
        if not meta_path.is_file():
            return None
        meta = self._read_meta(meta_path)
        if meta is not None and meta.get("fingerprint") != fingerprint:
            raise RunError(
                f"{self.path}: arm {arm!r} was run with a different recipe or different data. Choose a new output "
                f"directory, or delete {self.folds_dir / arm} to recompute this arm."
            )
        problem = "its .json is not readable" if meta is None else self._prediction_problem(meta, pred_path)
        if problem:
            self._set_aside(meta_path, pred_path, problem)
            return None
        return meta, pd.read_csv(pred_path, dtype={"patient": str, "image": str}, float_precision="round_trip")

    @staticmethod
    def _prediction_problem(meta: dict, pred_path: Path) -> str | None:
        if not pred_path.is_file():
            return "its predictions .csv is missing"
        data = pred_path.read_bytes()
        if meta.get("predictions_sha256") != hashlib.sha256(data).hexdigest():
            return "its predictions .csv does not match the checksum recorded in its .json"
        try:
            n = len(pd.read_csv(io.BytesIO(data)))
        except (ValueError, pd.errors.ParserError):
            return "its predictions .csv is not readable"
        if n != meta.get("n_predictions"):
            return f"its predictions .csv has {n} rows, its .json records {meta.get('n_predictions')}"
        return None

    def _set_aside(self, meta_path: Path, pred_path: Path, problem: str) -> None:
        for p in (meta_path, pred_path):
            if p.exists():
                os.replace(p, p.with_name(p.name + ".damaged"))
        self.damaged.append(f"{meta_path.parent.name}/{meta_path.stem}: {problem}; set aside (*.damaged) and recomputed")

    def write_fold(self, arm: str, split_name: str, meta: dict, predictions: pd.DataFrame) -> None:
        meta_path, pred_path = self._fold_paths(arm, split_name)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        data = predictions.to_csv(index=False).encode()
        meta = meta | {"n_predictions": len(predictions), "predictions_sha256": hashlib.sha256(data).hexdigest()}
        # Predictions first: a fold counts as done only once its json exists.
        atomic_write(pred_path, data)
        atomic_write(meta_path, json.dumps(meta, indent=1))

    def write_results(self, predictions: pd.DataFrame, metrics: dict) -> None:
        """predictions.csv and metrics.json, and in environment.json what each model unit's folds
        ran with (a resumed run's folds may have run under other settings than this session)."""
        env_path = self.path / "environment.json"
        env = json.loads(env_path.read_text()) if env_path.exists() else {}
        env["folds_compute"] = {name: [f"{s['setting']} ({s['folds']} fold{'' if s['folds'] == 1 else 's'})" for s in u["compute"]]
                                for name, u in metrics.get("arms", {}).items() if u.get("compute")}
        atomic_write(env_path, json.dumps(env, indent=2))
        atomic_write(self.path / "predictions.csv", predictions.to_csv(index=False))
        atomic_write(self.path / "metrics.json", strict_json(metrics))
