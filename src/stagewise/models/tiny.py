"""Tiny CNNs (about 15k parameters) and dual-input-output backbones.

The lightweight-CNN method trains two identical small networks at once, one on original
and one on augmented images, and joins their outputs; the pair is then used as one model
and fine-tuned with progressive unfreezing from the last layer backwards. Here the pair is
a `DualBackbone`: during a `dual` stage each branch gets its own stream, otherwise both
branches see the same image, which *is* the merged model (no weights are copied or
averaged, so the merged model equals the pair on the original stream by construction).

`scratch:tinycnn[-W1-W2-W3-W4]` builds the tiny CNN (see `scratch`); this module registers
the `dual:<spec>` source: two independently initialised copies of any sequential backbone
spec, built (or loaded) through the registry.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from stagewise.models.base import Backbone, BackboneError, InputSpec, pool_flat
from stagewise.models.registry import build_arch, create_backbone, register_source

DEFAULT_WIDTHS = (8, 16, 32, 28)


def parse_widths(name: str) -> tuple[int, ...]:
    """`tinycnn` or `tinycnn-8-16-32-28`: channel widths of the four conv groups."""
    parts = name.split("-")[1:]
    if not parts:
        return DEFAULT_WIDTHS
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        widths = ()
    if len(widths) != 4 or min(widths) < 1:
        raise BackboneError(f"{name!r}: write tinycnn or tinycnn-W1-W2-W3-W4 (four channel widths)")
    return widths


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def tiny_cnn(name: str = "tinycnn", in_channels: int = 1) -> Backbone:
    """Four 3x3 conv-BN-ReLU groups, two max-pools, global average pooling."""
    w1, w2, w3, w4 = parse_widths(name)
    net = nn.Sequential(OrderedDict(
        stem=nn.Sequential(*_conv(in_channels, w1)),
        block1=nn.Sequential(*_conv(w1, w2), nn.MaxPool2d(2)),
        block2=nn.Sequential(*_conv(w2, w3), nn.MaxPool2d(2)),
        block3=nn.Sequential(*_conv(w3, w4)),
    ))
    groups = OrderedDict((g, [g]) for g in ("stem", "block1", "block2", "block3"))
    return Backbone(net, groups, w4, InputSpec.gray(), f"scratch:{name}", pool_flat)


class DualBackbone(Backbone):
    """Two branches of one architecture; features are the two branches' features joined.

    Group k of the pair holds group k of both branches, so freezing and learning rates work
    per depth as for any backbone. `forward_pair(x_original, x_augmented)` is the dual
    training mode; `forward(x)` feeds both branches the same image (the merged model).
    """

    def __init__(self, a: Backbone, b: Backbone):
        if a.group_names != b.group_names or not a.sequential:
            raise BackboneError("a dual backbone needs two copies of one sequential architecture")
        net = nn.ModuleDict({"a": a, "b": b})
        groups = OrderedDict(
            (g, [f"a.net.{m}" for m in a.groups[g]] + [f"b.net.{m}" for m in b.groups[g]]) for g in a.group_names
        )
        super().__init__(net, groups, a.feature_dim + b.feature_dim, a.input_spec, f"dual:{a.arch}",
                         pool=None, sequential=False)

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if start != 0 or stop is not None:
            raise RuntimeError("a dual backbone runs only whole")
        return self.forward_pair(x, x)

    def forward_pair(self, x_original: torch.Tensor, x_augmented: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net["a"](x_original), self.net["b"](x_augmented)], dim=1)


def _build_dual(inner: str) -> Backbone:
    """Two independently initialised copies of `inner` (e.g. dual:scratch:tinycnn)."""
    return DualBackbone(build_arch(inner), build_arch(inner))


def _pretrained_dual(inner: str, *, weights: Path | None, cache_dir: Path | None, arch: str | None) -> Backbone:
    def make() -> Backbone:
        return create_backbone(inner, weights=weights, cache_dir=cache_dir, arch=arch)

    return DualBackbone(make(), make())


register_source(
    "dual",
    archs=("scratch:tinycnn",),
    build_arch=_build_dual,
    load_pretrained=_pretrained_dual,
    describe=[("dual:<spec>", "two copies of a backbone for dual-input-output training (e.g. dual:scratch:tinycnn)")],
)
