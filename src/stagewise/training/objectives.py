"""What a head predicts and how its loss is taken: binary (NaN = missing label), multiclass
or regression.

Kept apart from the training loop (`engine`) because inference (`engine.predict`), the pretrain
stage and the benchmarks use the same objective without the loop; `engine` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE over the labels that are present (NaN marks a missing label of one task)."""
    mask = ~torch.isnan(target)
    if not mask.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits.float()[mask], target[mask])


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mask = ~torch.isnan(target)
    if not mask.any():
        return pred.sum() * 0.0
    return F.mse_loss(pred.float()[mask], target[mask])


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class probabilities, so CutMix/MixUp targets work unchanged."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


@dataclass(frozen=True)
class Objective:
    """What the head predicts: `binary` (one logit per outcome, NaN = missing label),
    `multiclass` (targets hold a class index; one logit per class) or `regression`."""

    kind: str = "binary"
    n_classes: int = 0

    def train_targets(self, targets: torch.Tensor) -> torch.Tensor:
        if self.kind == "multiclass":
            return F.one_hot(targets[:, 0].long(), self.n_classes).float()
        return targets

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "multiclass":
            return soft_cross_entropy(out, target)
        if self.kind == "regression":
            return masked_mse(out, target)
        return masked_bce(out, target)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        out = out.float()
        if self.kind == "multiclass":
            return torch.softmax(out, dim=1)
        return out if self.kind == "regression" else torch.sigmoid(out)


BINARY = Objective()
