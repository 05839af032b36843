"""Grad-CAM maps for failure analysis: where a fold model looked on a right and a wrong call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stagewise.models.heads import Network


class _Logits(torch.nn.Module):
    def __init__(self, net: Network):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[:, :1]


def gradcam(net: Network, x: torch.Tensor) -> np.ndarray | None:
    """Grad-CAM (pytorch-grad-cam) on the last layer group for (N, 1, S, S) [0, 1] images,
    maps in [0, 1] of shape (N, S, S); None for backbones without a spatial last group."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    backbone = net.backbone
    if not backbone.sequential or x.dim() != 4:  # 2D maps only; volumes are not drawn
        return None
    target = backbone.group_modules(backbone.group_names[-1])[-1]
    net = net.float().eval()
    x = x.float().contiguous().requires_grad_(True)  # frozen weights: the graph must start at the input
    with GradCAM(model=_Logits(net), target_layers=[target]) as cam:
        return cam(input_tensor=x, targets=[BinaryClassifierOutputTarget(1)] * len(x))


def save_overlay(image: np.ndarray, cam: np.ndarray, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.6, 2.8), dpi=100)
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def pick_examples(y: np.ndarray, prob: np.ndarray, pred: np.ndarray, n: int) -> list[int]:
    """Positions of the n most confident correct and the n most confident wrong predictions."""
    confidence = np.abs(prob - 0.5)
    correct = np.flatnonzero(pred == y)
    wrong = np.flatnonzero(pred != y)
    pick = lambda idx: idx[np.argsort(-confidence[idx], kind="stable")][:n].tolist()  # noqa: E731
    return pick(correct) + pick(wrong)
