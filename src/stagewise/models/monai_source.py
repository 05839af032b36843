"""`monai:<arch>`: 3D backbones for volumes (brain MRI and other NIfTI scans), from MONAI.

`monai:<arch>` wraps a MONAI network built for one-channel 3D input into the same
`Backbone` as the 2D trunks: ordered layer groups (stem, layer1..layer4 for a ResNet;
stem, block1..block4 for a DenseNet), pooled features, and sequential execution, so probe,
thaw and finetune stages, per-group learning rates and cached frozen prefixes all work on
(N, 1, D, H, W) volumes unchanged.

Weights: these networks start from a random initialisation. MONAI publishes no ImageNet-
style weights for them that a library cache here could supply (its `pretrained=True`
fetches MedicalNet files from the internet for a few ResNets only), so, as for the
`scratch:` source, nothing is downloaded. A local state dict that fits the architecture can
be given as `backbone.weights` (keys prefixed `module.`, as in MedicalNet's files, are
accepted); the ResNets use MedicalNet's stem (7^3 convolution, stride 2) and bias-free
downsampling convolutions, so MedicalNet's resnet10/resnet50 files fit. A backbone saved by
stagewise (`save_backbone`, a study's pretrained/ folder) is rebuilt from its recorded
`stagewise_arch` by `file:` and `run:` like any other.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from torch import nn

from stagewise.models.base import Backbone, BackboneError, InputSpec, load_into, load_state_file, pool_flat, wrap_densenet
from stagewise.models.registry import register_source

_RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50")
_DENSENETS = ("densenet121",)
MONAI_ARCHS = _RESNETS + _DENSENETS


def monai_arch(name: str) -> Backbone:
    """The MONAI 3D network `name` (one input channel) with random weights, wrapped in groups.

    The ResNets run on cubes from 16^3 up; densenet121 halves the side six times and needs
    data.image_size >= 32.
    """
    if name not in MONAI_ARCHS:
        raise BackboneError(f"MONAI architecture {name!r} is not supported; choose one of {list(MONAI_ARCHS)}")
    try:
        from monai.networks import nets
    except ImportError as err:
        raise BackboneError(f"monai:{name} needs MONAI (pip install monai): {err}") from None
    if name in _RESNETS:
        net = getattr(nets, name)(
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            bias_downsample=False,
            feed_forward=False,
        )
        return _wrap_monai_resnet(net, f"monai:{name}")
    net = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=1)
    return _wrap_monai_densenet(net, f"monai:{name}")


def monai_backbone(name: str, *, weights: Path | None = None, cache_dir: Path | None = None, arch: str | None = None) -> Backbone:
    """`monai:<arch>` from a recipe: random init, or the local `backbone.weights` file."""
    backbone = monai_arch(name)
    if weights is not None:
        state = load_state_file(weights)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("class_layers.")}  # MONAI DenseNet's head
        load_into(backbone, state, strict_head=False, source=str(weights))
    return backbone


def _wrap_monai_resnet(net: nn.Module, arch: str) -> Backbone:
    """MONAI ResNet groups: stem (conv1, bn1, act, maxpool), then layer1..layer4."""
    groups = OrderedDict(stem=["conv1", "bn1", "act", "maxpool"])
    for i in range(1, 5):
        groups[f"layer{i}"] = [f"layer{i}"]
    return Backbone(net, groups, net.in_planes, InputSpec.gray(), arch, pool_flat)


def _wrap_monai_densenet(net: nn.Module, arch: str) -> Backbone:
    """MONAI's DenseNet has torchvision's layout; its classification layers are removed."""
    return wrap_densenet(net, InputSpec.gray(), arch, classifier="class_layers")


register_source(
    "monai",
    archs=MONAI_ARCHS,
    build_arch=monai_arch,
    load_pretrained=monai_backbone,
    describe=[("monai:<arch>", "3D, for NIfTI volumes; MONAI network, random init (or backbone.weights), 1 channel: "
               + ", ".join(MONAI_ARCHS) + " (densenet121: image_size >= 32)")],
)
