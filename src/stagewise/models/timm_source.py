"""`timm:<name>`: any timm model, pretrained through timm (Hugging Face hub cache or URL).

Layer groups come from the model's own `group_matcher(coarse=True)` (stem, block1..blockN),
with parameter names per group, since some parameters (a ViT's pos_embed) belong to no
listed module. timm models run only whole (not sequential): features are timm's pooled
pre-logits. `scratch:timm:<name>` is the same architecture with random weights and one
input channel.

Loading: timm 1.0 reads hub/URL checkpoints and a local `weights` file
(`pretrained_cfg_overlay=dict(file=...)`) with `torch.load(weights_only=True)` or
safetensors, so no code in a file runs; tests/test_models.py checks that a crafted pickle
given as `weights` is refused, in case a timm release changes this.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from stagewise.models.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneError, InputSpec, WeightsUnavailable
from stagewise.models.registry import register_source
from stagewise.models.safe_pickle import refusal

# Small models the conformance tests build (test_vit: a ViT with pos_embed and cls_token).
TIMM_TEST_ARCHS = ("resnet18", "test_vit")


def timm_backbone(name: str, pretrained: bool, weights: Path | None = None, cache_dir: Path | None = None) -> Backbone:
    """timm's `name` with timm's groups: pretrained (3 channels, its published normalisation)
    or random (1 channel, gray convention)."""
    import timm
    from timm.models import group_modules, group_parameters

    kwargs: dict = dict(num_classes=0)
    if pretrained and weights is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if not pretrained:
        kwargs["in_chans"] = 1
    try:
        net = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise BackboneError(f"timm has no model {name!r} (see timm.list_models())") from None
        raise _unavailable(name, err, weights) from None
    except Exception as err:
        raise _unavailable(name, err, weights) from None
    matcher = net.group_matcher(coarse=True)
    modules_by_index = group_modules(net, matcher)
    params_by_index = group_parameters(net, matcher)
    groups, param_names = OrderedDict(), {}
    for i, idx in enumerate(sorted(params_by_index)):
        group = "stem" if i == 0 else f"block{i}"
        groups[group] = _outermost(modules_by_index.get(idx, []))
        param_names[group] = params_by_index[idx]
    if pretrained:
        pc = net.pretrained_cfg
        spec = InputSpec(3, tuple(pc.get("mean", IMAGENET_MEAN)), tuple(pc.get("std", IMAGENET_STD)))
    else:
        spec = InputSpec.gray()
    return Backbone(net, groups, net.num_features, spec, f"timm:{name}", _features, sequential=False,
                    param_names=param_names)


def _features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits features of a timm model. It takes the net as an argument (no closure)
    so that a deep copy of the backbone runs its own copied weights."""
    return net.forward_head(net.forward_features(x), pre_logits=True)


def _outermost(names: list[str]) -> list[str]:
    """Module names with those nested inside another listed module removed."""
    names = sorted(set(names))
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _unavailable(name: str, err: Exception, weights: Path | None) -> WeightsUnavailable:
    if weights is not None:
        return WeightsUnavailable(
            f"timm weights for {name!r} could not be loaded from {weights} ({type(err).__name__}: {refusal(err)[:300]})"
        )
    from huggingface_hub.constants import HF_HUB_CACHE

    return WeightsUnavailable(
        f"timm weights for {name!r} could not be loaded ({type(err).__name__}: {str(err)[:200]}). Offline, "
        f"put the Hugging Face snapshot under {HF_HUB_CACHE} and set HF_HUB_OFFLINE=1, or set backbone.weights "
        "to a local .safetensors/.pth file of that model."
    )


def _build(name: str) -> Backbone:
    return timm_backbone(name, pretrained=False)


def _pretrained(name: str, *, weights: Path | None, cache_dir: Path | None, arch: str | None) -> Backbone:
    return timm_backbone(name, pretrained=True, weights=weights, cache_dir=cache_dir)


register_source(
    "timm",
    archs=TIMM_TEST_ARCHS,
    build_arch=_build,
    load_pretrained=_pretrained,
    describe=[("timm:<name>", "timm model with pretrained=True; groups from timm's group_matcher")],
)
