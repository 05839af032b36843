"""The `ssl` stage kind: self-supervised training of the whole backbone (SimCLR and BYOL
through lightly's losses and heads; a sparse convolutional autoencoder for the "unsupervised
retraining" step), with heads of its own that are thrown away afterwards. On a source
manifest it runs once per arm before cross-validation; with `source: target` it runs in each
fold on that fold's training images, labels ignored. Never federated."""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stagewise.models.base import Backbone
from stagewise.recipe import AugmentConfig, SslStage
from stagewise.training.augment import augment_batch
from stagewise.training.cache import ImageSet
from stagewise.training.compute import Compute
from stagewise.training.engine import StageLog, batches
from stagewise.training.memory import peak_memory, reset_peak
from stagewise.training.stages.registry import FoldData, StageKind, register_stage_kind

# Views for contrastive learning on gray medical images: no colour jitter or grayscale
# switching (meaningless here), but crops, small rotations, flips and intensity changes.
SSL_VIEWS = AugmentConfig(flip=True, rotate=15, translate=0.1, scale=0.3, intensity=0.4)


class _Decoder(nn.Module):
    """Pooled features -> image: the autoencoder's decoder (its encoder is the backbone)."""

    def __init__(self, feature_dim: int, size: int):
        super().__init__()
        self.base = max(2, size // 16)
        self.fc = nn.Linear(feature_dim, 64 * self.base * self.base)
        layers, ch, side = [], 64, self.base
        while side < size:
            out = max(8, ch // 2)
            layers += [nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            ch, side = out, side * 2
        layers.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.up = nn.Sequential(*layers)
        self.size = size

    def forward(self, z):
        x = self.up(self.fc(z).view(-1, 64, self.base, self.base))
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


def _ssl_modules(backbone: Backbone, stage: SslStage, size: int) -> dict[str, nn.Module]:
    from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead

    d = backbone.feature_dim
    if stage.method == "autoencoder" and backbone.spatial_dims != 2:
        raise ValueError("the ssl autoencoder decodes 2D images; use method simclr or byol for volumes")
    if stage.method == "simclr":
        return {"projection": SimCLRProjectionHead(d, max(d, 128), stage.projection_dim)}
    if stage.method == "byol":
        return {
            "projection": BYOLProjectionHead(d, 2 * d, stage.projection_dim),
            "prediction": BYOLPredictionHead(stage.projection_dim, 2 * d, stage.projection_dim),
        }
    return {"decoder": _Decoder(d, size)}


def fit_ssl(
    backbone: Backbone, stage: SslStage, images: ImageSet, idx: np.ndarray, compute: Compute,
    seed: int, on_epoch: Callable[[int, dict], None] | None = None,
) -> StageLog:
    """Self-supervised training of the whole backbone on images[idx] (labels never used)."""
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    views = stage.augment if stage.augment.active else SSL_VIEWS
    heads = nn.ModuleDict(_ssl_modules(backbone, stage, images.x.shape[-1])).to(compute.device)
    backbone.train()
    for p in backbone.parameters():
        p.requires_grad_(True)
    lr = stage.lr["head"] if isinstance(stage.lr, dict) else stage.lr
    optimizer = torch.optim.AdamW([*backbone.parameters(), *heads.parameters()], lr=lr,
                                  weight_decay=stage.group_weight_decay("head"), **compute.optimizer_options)
    if stage.method == "byol":  # the target network: an exponential moving average of the online one
        target = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "projection": copy.deepcopy(heads["projection"])})
        deactivate_requires_grad(target)
    ntxent, ncs = NTXentLoss(temperature=stage.temperature), NegativeCosineSimilarity()
    steps = len(batches(np.arange(len(idx)), stage.batch_size)) * stage.epochs
    log, step = StageLog(stage.kind), 0
    reset_peak(compute.device)
    for epoch in range(stage.epochs):
        t0, losses = time.perf_counter(), []
        order = idx[torch.randperm(len(idx), generator=g).numpy()]
        for batch in batches(order, stage.batch_size):
            x = compute.to_input(images.x[torch.as_tensor(batch)]).float()
            with compute.autocast():
                if stage.method == "autoencoder":
                    z = backbone(augment_batch(x, views, g))
                    recon = heads["decoder"](z)
                    loss = F.mse_loss(recon.float(), x) + 1e-4 * z.float().abs().mean()  # sparse code
                else:
                    v0, v1 = augment_batch(x, views, g), augment_batch(x, views, g)
                    if stage.method == "simclr":
                        loss = ntxent(heads["projection"](backbone(v0)).float(), heads["projection"](backbone(v1)).float())
                    else:
                        m = cosine_schedule(step, steps, 0.99, 1.0)
                        update_momentum(backbone, target["backbone"], m)
                        update_momentum(heads["projection"], target["projection"], m)
                        p0 = heads["prediction"](heads["projection"](backbone(v0)))
                        p1 = heads["prediction"](heads["projection"](backbone(v1)))
                        with torch.no_grad():
                            t0_ = target["projection"](target["backbone"](v0))
                            t1_ = target["projection"](target["backbone"](v1))
                        loss = 0.5 * (ncs(p0.float(), t1_.float()) + ncs(p1.float(), t0_.float()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
        entry = {"epoch": epoch, "loss": float(np.mean(losses)), "method": stage.method,
                 "seconds": time.perf_counter() - t0}
        if not math.isfinite(entry["loss"]):
            raise FloatingPointError(f"ssl stage: the loss became {entry['loss']} in epoch {epoch + 1}; lower the learning rate")
        log.epochs.append(entry)
        if on_epoch is not None:
            on_epoch(epoch, entry)
    for p in backbone.parameters():
        p.requires_grad_(False)
    log.memory = peak_memory(compute.device)
    return log


def fit_ssl_fold(net, stage: SslStage, data: FoldData, compute: Compute, cache, seed: int, on_epoch) -> StageLog:
    """On this fold's training images only (at a label fraction: every training image, its
    label unused), labels ignored; the task head is untouched."""
    rows = data.rows if data.unlabeled is None else data.unlabeled
    return fit_ssl(net.backbone, stage, data.images, rows, compute, seed, on_epoch)


register_stage_kind(StageKind(
    name="ssl", schema=SslStage,
    summary="self-supervised backbone training (SimCLR, BYOL, autoencoder), before cross-validation or per fold",
    fit_fold=fit_ssl_fold,
    fit_source=lambda backbone, stage, images, source, compute, seed, on_epoch: fit_ssl(
        backbone, stage, images, np.arange(len(images)), compute, seed, on_epoch),
    example={"kind": "ssl", "source": "target", "method": "simclr", "epochs": 5, "batch_size": 32, "lr": 1e-3},
))
