"""A fold's Grad-CAM examples, saved as PNGs in the run directory for the report's failure
analysis: the most confident correct and wrong calls of the model evaluated.

One drawing path serves every arm. A pooled arm's maps are its fold model's on the fold's
test images. A federated arm has no fold model of its own at one place: its maps are the
final global model's (the fold's starting network with every aggregated tensor in place, the
model a federated refit exports), on a few test images of each site, each site's examples
picked apart so that every site is shown. The probability on a map is the probability of the
model the map was drawn from, decided at the fold's threshold.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from stagewise.evaluation.saliency import gradcam, pick_examples, save_overlay
from stagewise.models import Network
from stagewise.training.cache import ImageSet
from stagewise.training.compute import Compute
from stagewise.training.engine import predict


def saliency_examples(net: Network, x: torch.Tensor, rows: np.ndarray, row_ids: np.ndarray, y: np.ndarray,
                      prob: np.ndarray, threshold: float, n: int, folder: Path, run_path: Path, stem: str,
                      about: dict | None = None) -> list[dict]:
    """Maps of the `n` most confident correct and `n` most confident wrong calls among `rows`
    (indices into `x`; `row_ids` the cohort's row numbers, which name the files, never a
    patient), with labels `y` and the model's probabilities `prob` decided at `threshold`.
    Returns one record per map saved (file relative to `run_path`, row, y, p, correct, and
    `about`); none for a backbone without spatial features."""
    prob = np.asarray(prob, dtype=float)
    pred = (prob >= threshold).astype(int)
    pos = pick_examples(np.asarray(y).astype(int), prob, pred, n)
    if not pos:
        return []
    chosen = x[torch.as_tensor(np.asarray(rows)[pos])]
    maps = gradcam(copy.deepcopy(net).cpu(), chosen)
    if maps is None:
        return []
    out = []
    for i, p in enumerate(pos):
        correct = bool(pred[p] == int(y[p]))
        title = (f"{'correct' if correct else 'wrong'} call: y = {int(y[p])}\n"
                 f"p = {prob[p]:.3f}, threshold {threshold:.3f}")
        path = save_overlay(chosen[i, 0].float().numpy(), maps[i], folder / f"{stem}-row{int(row_ids[p])}.png", title)
        out.append({"file": str(path.relative_to(run_path)), "row": int(row_ids[p]), "y": int(y[p]),
                    "prob": float(prob[p]), "correct": correct, **(about or {})})
    return out


def site_saliency_examples(net: Network, images: ImageSet, rows: np.ndarray, row_ids: np.ndarray, y: np.ndarray,
                           sites: np.ndarray, threshold: float, n: int, folder: Path, run_path: Path, stem: str,
                           compute: Compute) -> list[dict]:
    """A federated fold's maps: the final global model `net` at each site, on that site's own
    test rows among `rows` (`sites`, `y` and `row_ids` per row of `rows`), up to `n` correct
    and `n` wrong calls per site, each record naming its site."""
    if not len(rows):
        return []
    prob = predict(net, images, rows, compute, None)[:, 0]
    out = []
    for site in dict.fromkeys(str(s) for s in sites):
        at = np.flatnonzero(sites.astype(str) == site)
        out += saliency_examples(net, images.x, rows[at], row_ids[at], y[at], prob[at], threshold, n, folder,
                                 run_path, stem, {"site": site, "model": "final global model"})
    return out
