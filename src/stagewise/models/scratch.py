"""`scratch:<arch>`: random initialisation for one-channel input, nothing downloaded.

A baseline every transfer study needs (does pretraining help at all?), and the start of a
study's own pretraining. It builds other sources' architectures with one input channel and
the gray input convention: torchvision's ResNets/DenseNets, the tiny CNN, or
`scratch:timm:<name>` for a timm model. It registers no architecture of its own and holds no
weights, so `weights`, `cache_dir` and `arch` are ignored, as for any random start.
"""

from __future__ import annotations

from pathlib import Path

from stagewise.models.base import Backbone
from stagewise.models.registry import build_arch, register_source
from stagewise.models.tiny import tiny_cnn
from stagewise.models.torchvision_source import TV_ARCHS, torchvision_arch


def scratch_arch(name: str) -> Backbone:
    """Random init for a one-channel input; `scratch:timm:<name>` for a timm model."""
    if name.startswith("timm:"):
        return build_arch(name)  # timm's random init already takes one channel
    if name.startswith("tinycnn"):
        return tiny_cnn(name)
    b = torchvision_arch(name, 1)
    b.arch = f"scratch:{name}"
    return b


def _pretrained(name: str, *, weights: Path | None, cache_dir: Path | None, arch: str | None) -> Backbone:
    return scratch_arch(name)


register_source(
    "scratch",
    archs=("tinycnn", "tinycnn-4-8-8-8", *TV_ARCHS, "timm:test_vit"),
    build_arch=scratch_arch,
    load_pretrained=_pretrained,
    describe=[("scratch:<arch>", "random init, 1 channel: torchvision archs, tinycnn[-W1-W2-W3-W4] (~15k params) "
               "or scratch:timm:<name>")],
)
