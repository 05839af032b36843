"""Source manifests for pretrain and ssl stages: images with source-task labels, or none.

A source cohort is not the study cohort: no patient grouping or binary outcome is
required, only readable images and, for a pretrain stage, labels of the source task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stagewise.data.cohort import CohortError
from stagewise.recipe import SourceConfig

_TRUE = {"1", "1.0", "true", "yes", "y", "positive"}
_FALSE = {"0", "0.0", "false", "no", "n", "negative"}


@dataclass
class SourceData:
    paths: list[str]
    targets: torch.Tensor
    """(N, T): class index (classification), 0/1 with NaN missing (multilabel), value (regression)."""
    classes: list[str]
    """classification: the class names in index order; otherwise the target columns."""

    @property
    def n_outputs(self) -> int:
        return len(self.classes)


def load_source(cfg: SourceConfig) -> SourceData:
    manifest = Path(cfg.manifest)
    if not manifest.is_file():
        raise CohortError([f"source manifest {manifest} does not exist"], manifest)
    try:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except Exception as err:
        raise CohortError([f"cannot read the source manifest as CSV: {err}"], manifest) from None
    missing_cols = [c for c in [cfg.image, *cfg.targets] if c not in df.columns]
    if missing_cols:
        raise CohortError([f"unknown column(s) {missing_cols}; the manifest has {list(df.columns)}"], manifest)
    if df.empty:
        raise CohortError(["the source manifest has no rows"], manifest)
    root = Path(cfg.root) if cfg.root else manifest.parent
    problems, paths = [], []
    for i, raw in enumerate(df[cfg.image].str.strip()):
        path = Path(raw) if Path(raw).is_absolute() else root / raw
        if not raw or not path.is_file():
            problems.append(f"row {i + 2}: image file {path} does not exist")
        paths.append(str(path))
    targets, classes = _targets(df, cfg, problems)
    if problems:
        raise CohortError(problems, manifest)
    return SourceData(paths, targets, classes)


def _targets(df: pd.DataFrame, cfg: SourceConfig, problems: list[str]) -> tuple[torch.Tensor, list[str]]:
    if not cfg.targets:
        return torch.zeros(len(df), 0), []
    if cfg.task == "classification":
        col = df[cfg.targets[0]].str.strip()
        for i in np.flatnonzero(col == ""):
            problems.append(f"row {i + 2}: the label (column {cfg.targets[0]!r}) is empty")
        classes = sorted(set(col) - {""})
        if len(classes) < 2:
            problems.append(f"column {cfg.targets[0]!r} holds fewer than two classes: {classes}")
        index = {c: k for k, c in enumerate(classes)}
        return torch.tensor([[float(index.get(v, 0))] for v in col]), classes
    out = np.full((len(df), len(cfg.targets)), np.nan, dtype=np.float32)
    for j, name in enumerate(cfg.targets):
        for i, raw in enumerate(df[name].str.strip()):
            v = raw.lower()
            if not v:
                continue
            if cfg.task == "multilabel":
                if v in _TRUE or v in _FALSE:
                    out[i, j] = float(v in _TRUE)
                else:
                    problems.append(f"row {i + 2}: column {name!r} value {raw!r} is not 0/1 (or yes/no)")
            else:
                try:
                    out[i, j] = float(raw)
                except ValueError:
                    problems.append(f"row {i + 2}: column {name!r} value {raw!r} is not a number")
    if cfg.task == "regression" and np.isnan(out).all():
        problems.append(f"column {cfg.targets[0]!r} holds no values")
    return torch.from_numpy(out), list(cfg.targets)
