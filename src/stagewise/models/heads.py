"""Heads on top of backbone features, and the backbone + head network.

Plain parameters (dropout, hidden width), not recipe types: the model layer does not depend
on the recipe schema, so a saved network or bundle can be rebuilt from its metadata alone.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from stagewise.models.base import Backbone, BackboneError


class Head(nn.Module):
    """Dropout -> Linear (or a one-hidden-layer MLP), Xavier-initialised.

    `n_outputs` is one logit per binary outcome, so several outcomes share one head.
    """

    def __init__(self, in_features: int, n_outputs: int = 1, dropout: float = 0.1, hidden: int | None = None):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            in_features = hidden
        layers.append(nn.Linear(in_features, n_outputs))
        self.layers = nn.Sequential(*layers)
        for m in self.layers:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Network(nn.Module):
    """Backbone + head.

    `forward(x, start=k)` resumes after k backbone groups from a cached prefix output;
    k equal to the number of groups means `x` holds pooled features (N, C), or the last
    group's feature maps (augmented on them), which are pooled here.
    """

    def __init__(self, backbone: Backbone, head: Head, n_extra: int = 0):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.n_extra = n_extra
        """Width of the clinical vector joined to the image features (0: image only)."""

    @classmethod
    def build(
        cls, backbone: Backbone, n_outputs: int = 1, n_extra: int = 0, dropout: float = 0.1, hidden: int | None = None,
        pretrained_head: bool = False,
    ) -> "Network":
        """`backbone` + a new head over its features and `n_extra` clinical values; with
        `pretrained_head`, the head published with the backbone's weights instead (a linear
        head of the same shape: one outcome, no hidden layer, no clinical values)."""
        head = Head(backbone.feature_dim + n_extra, n_outputs, dropout, hidden)
        if pretrained_head:
            published = backbone.published_head
            if published is None:
                raise BackboneError(f"{backbone.arch}: head.pretrained is set, but these weights come without a head "
                                    "(the bpd: models and their checkpoint files have one); remove head.pretrained")
            last = head.layers[-1]
            if hidden or n_extra or tuple(published["weight"].shape) != tuple(last.weight.shape):
                raise BackboneError(
                    f"{backbone.arch}: the published head maps {published['weight'].shape[1]} features to "
                    f"{published['weight'].shape[0]} output(s); this arm's head has {n_outputs} output(s)"
                    f"{', a hidden layer' if hidden else ''}{', clinical values' if n_extra else ''}. "
                    "Remove head.pretrained to start from a new head")
            with torch.no_grad():
                last.weight.copy_(published["weight"])
                last.bias.copy_(published["bias"])
        return cls(backbone, head, n_extra)

    @property
    def group_names(self) -> list[str]:
        """Trainable groups from the input upwards, the head last."""
        return self.backbone.group_names + ["head"]

    def group_parameters(self) -> "OrderedDict[str, list[nn.Parameter]]":
        out = OrderedDict((g, self.backbone.group_parameters(g)) for g in self.backbone.group_names)
        out["head"] = list(self.head.parameters())
        return out

    def forward(self, x: torch.Tensor, start: int = 0, extra: torch.Tensor | None = None) -> torch.Tensor:
        if start < len(self.backbone.group_names) or x.dim() > 2:
            x = self.backbone(x, start=start)
        if self.n_extra:
            if extra is None or extra.shape[1] != self.n_extra:
                raise ValueError(f"this network fuses {self.n_extra} clinical values per image; pass them as `extra`")
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        return self.head(x)
