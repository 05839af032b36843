"""AdaBN (Li et al. 2016, "Revisiting batch normalization for practical domain adaptation"):
the BatchNorm statistics of the frozen groups re-estimated on the target images, then fixed.

`bn: adapt_once` in a stage. The BPD code keeps the whole network in train mode (`bn: adapt`),
so every forward of its frozen groups depends on its batch and nothing can be cached. Re-
estimating the statistics once on the fold's training images adapts them to the cohort
in the same spirit, and afterwards the frozen groups compute a fixed function of each image.
The estimate is torch's own `update_bn` (the cumulative average over the batches, as SWA uses
it), run over the frozen groups only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.optim.swa_utils import update_bn

from stagewise.models.heads import Network
from stagewise.training.cache import ImageSet, resumable_depths
from stagewise.training.compute import Compute


class _FrozenPrefix(torch.nn.Module):
    """The first k groups of a backbone as one module: only their BatchNorm layers are
    registered (and so reset and re-estimated); the forward stops after group k."""

    def __init__(self, net: Network, k: int):
        super().__init__()
        backbone = net.backbone
        self.frozen = torch.nn.ModuleList(m for g in backbone.group_names[:k] for m in backbone.group_modules(g))
        object.__setattr__(self, "_backbone", backbone)  # run, not registered
        n = len(backbone.group_names)
        self._stop = None if k == n or k not in resumable_depths(net) else k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._backbone(x, start=0, stop=self._stop)


def adapt_batchnorm(net: Network, k: int, images: ImageSet, rows: np.ndarray, compute: Compute) -> int:
    """Re-estimate the BatchNorm statistics of backbone groups 0..k-1 on images[rows]; return
    how many BatchNorm layers were re-estimated. Weights are untouched; every other layer runs
    in eval mode, so no other statistic moves."""
    if k == 0 or len(rows) == 0:
        return 0
    prefix = _FrozenPrefix(net, k)
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in prefix.modules())
    if n_bn == 0:
        return 0
    net.eval()
    prefix.eval()  # update_bn restores this mode when it is done
    order = torch.as_tensor(np.asarray(rows))
    step = compute.eval_batch_size
    cuts = list(range(0, len(order), step)) + [len(order)]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:  # train-mode BatchNorm needs two values per channel
        del cuts[-2]
    batches = (compute.to_input(images.x[order[a:b]]) for a, b in zip(cuts, cuts[1:]))
    update_bn(batches, prefix)
    return n_bn
