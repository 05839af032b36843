"""`torchvision:<arch>[.<WEIGHTS>]`: ImageNet-pretrained ResNets and DenseNets from torchvision.

Weights come through torch.hub's cache (`load_state_dict_from_url(weights_only=True)`, so a
file placed in that cache is read as tensors only), or from a local `weights` file; offline,
the error names the URL and the exact cache path. The architectures are also what
`scratch:<arch>` builds with one input channel (see `scratch`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stagewise.models.base import (
    Backbone,
    BackboneError,
    InputSpec,
    WeightsUnavailable,
    load_into,
    load_state_file,
    set_in_chans,
    wrap_densenet,
    wrap_resnet,
)
from stagewise.models.registry import register_source
from stagewise.models.safe_pickle import refusal

TV_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "densenet121", "densenet169", "densenet201")


def torchvision_arch(name: str, channels: int) -> Backbone:
    """torchvision's `name` with random weights, for `channels` input channels (3: ImageNet
    convention; otherwise a fresh first convolution and the gray convention)."""
    import torchvision

    if name not in TV_ARCHS:
        raise BackboneError(f"torchvision architecture {name!r} is not supported; choose one of {list(TV_ARCHS)}")
    net = torchvision.models.get_model(name, weights=None)
    spec = InputSpec.imagenet() if channels == 3 else InputSpec.gray()
    if name.startswith("resnet"):
        if channels != 3:
            set_in_chans(net, "conv1", channels)
        return wrap_resnet(net, spec, f"torchvision:{name}")
    if channels != 3:
        set_in_chans(net, "features.conv0", channels)
    return wrap_densenet(net, spec, f"torchvision:{name}")


def _build(name: str) -> Backbone:
    return torchvision_arch(name.partition(".")[0], 3)


def _pretrained(name: str, *, weights: Path | None, cache_dir: Path | None, arch: str | None) -> Backbone:
    import torchvision

    arch_name, _, tag = name.partition(".")
    backbone = torchvision_arch(arch_name, 3)
    if weights is not None:
        state = load_state_file(weights)
    else:
        enum = torchvision.models.get_model_weights(arch_name)
        if tag and tag not in enum.__members__:
            raise BackboneError(
                f"torchvision:{name}: torchvision has no weights {tag!r} for {arch_name}; "
                f"choose one of {list(enum.__members__)} (or leave the tag out for {enum.DEFAULT.name})"
            )
        published = enum[tag] if tag else enum.DEFAULT
        folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
        target = folder / os.path.basename(published.url)
        try:
            state = torch.hub.load_state_dict_from_url(published.url, model_dir=str(folder), progress=False, weights_only=True)
        except Exception as err:
            if target.is_file():  # present, so not a download problem: refused or damaged
                raise WeightsUnavailable(
                    f"torchvision weights {published}: {target} is not a readable weights file "
                    f"({type(err).__name__}: {refusal(err)}); delete it and download it again from {published.url}"
                ) from None
            raise WeightsUnavailable(
                f"torchvision weights {published} are not cached and could not be downloaded ({type(err).__name__}). "
                f"Download {published.url} and place it at {target}, or set backbone.weights to a local copy."
            ) from None
    load_into(backbone, state, strict_head=False, source=str(weights or name))
    return backbone


register_source(
    "torchvision",
    archs=TV_ARCHS,
    build_arch=_build,
    load_pretrained=_pretrained,
    describe=[("torchvision:<arch>[.<WEIGHTS>]", "ImageNet weights via torchvision: " + ", ".join(TV_ARCHS))],
)
