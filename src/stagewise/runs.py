"""The run directory: resolved recipe, versions, per-fold results, predictions, metrics, log.

Every fold is written atomically as soon as it finishes, with a hash of everything that
determines its numbers. Running the same recipe again reads finished folds back instead
of recomputing them; a fold made by a different recipe is never silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from stagewise import __version__
from stagewise.recipe import ArmConfig, Recipe, recipe_to_dict


class RunError(RuntimeError):
    """A run directory that cannot be used for this recipe."""


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def unit_fingerprint(recipe: Recipe, kind: str, arm: ArmConfig | None, fraction: float, column: str | None) -> str:
    """Hash of what decides a unit's fold results: cohort, data, protocol, seed, precision and
    the unit itself (arm and label fraction, baseline column, or clinical columns)."""
    protocol = recipe.protocol.model_dump(mode="json")
    protocol.pop("label_fractions")  # adding a fraction must not invalidate finished arms
    relevant = {
        "seed": recipe.seed,
        "cohort": recipe.cohort.model_dump(mode="json"),
        "protocol": protocol,
        "kind": kind,
    }
    if kind == "model":
        relevant |= {
            "data": recipe.data.model_dump(mode="json"),
            "precision": [recipe.compute.device, recipe.compute.precision, recipe.compute.channels_last],
            "arm": arm.model_dump(mode="json"),
            "fraction": fraction,
        }
    else:
        relevant["column"] = column
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_fingerprint(recipe: Recipe, arm: ArmConfig) -> str:
    """Hash of what decides an arm's pretrained backbone: its backbone, data size, seed and
    the stages on source manifests."""
    relevant = {
        "seed": recipe.seed,
        "data": recipe.data.model_dump(mode="json"),
        "precision": [recipe.compute.device, recipe.compute.precision, recipe.compute.channels_last],
        "backbone": arm.backbone.model_dump(mode="json"),
        "stages": [s.model_dump(mode="json") for s in arm.stages if s.external],
    }
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
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


@dataclass
class RunDir:
    path: Path

    def __post_init__(self):
        self.path = Path(self.path)

    @property
    def folds_dir(self) -> Path:
        return self.path / "folds"

    def start(self, recipe: Recipe) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.folds_dir.mkdir(exist_ok=True)
        _atomic_write(self.path / "recipe.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        env = environment() | {"seed": recipe.seed}
        _atomic_write(self.path / "environment.json", json.dumps(env, indent=2))

    def pretrained_path(self, arm: str, fingerprint: str) -> Path:
        return self.path / "pretrained" / f"{arm}-{fingerprint}.safetensors"

    def _fold_paths(self, arm: str, split_name: str) -> tuple[Path, Path]:
        d = self.folds_dir / arm
        return d / f"{split_name}.json", d / f"{split_name}.csv"

    def read_fold(self, arm: str, split_name: str, fingerprint: str) -> tuple[dict, pd.DataFrame] | None:
        """A finished fold of this arm, or None; an incompatible one is an error."""
        meta_path, pred_path = self._fold_paths(arm, split_name)
        if not (meta_path.is_file() and pred_path.is_file()):
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != fingerprint:
            raise RunError(
                f"{self.path}: arm {arm!r} was run with a different recipe (cohort, data, protocol, seed, "
                f"precision or the arm itself changed). Choose a new output directory, or delete "
                f"{self.folds_dir / arm} to recompute this arm."
            )
        return meta, pd.read_csv(pred_path, dtype={"patient": str})

    def write_fold(self, arm: str, split_name: str, meta: dict, predictions: pd.DataFrame) -> None:
        meta_path, pred_path = self._fold_paths(arm, split_name)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        # Predictions first: a fold counts as done only once its json exists.
        _atomic_write(pred_path, predictions.to_csv(index=False))
        _atomic_write(meta_path, json.dumps(meta, indent=1))

    def write_results(self, predictions: pd.DataFrame, metrics: dict) -> None:
        _atomic_write(self.path / "predictions.csv", predictions.to_csv(index=False))
        _atomic_write(self.path / "metrics.json", json.dumps(_nan_to_null(metrics), indent=2, allow_nan=False))


def _nan_to_null(value):
    """Strict JSON: an undefined metric (AUROC of a one-class fold) is null, not NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_null(v) for v in value]
    return value
