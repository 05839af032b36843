"""`xrv:<weights>`: chest-X-ray-pretrained networks published by torchxrayvision.

torchxrayvision's own constructors load their files with `torch.load(weights_only=False)`,
which runs any code a pickle names, and the file name they look for is one stagewise's
offline error tells users to download and place by hand. So stagewise uses the library
only to locate the file (its URL table and cache folder) and, when online, to download a
missing one (`xrv.models.get_weights` downloads without loading); it reads the file itself,
as tensors only (`safe_pickle.load_tensors`: the ResNet file is a state dict, the DenseNet
files are whole pickled networks), builds the network without weights and loads them into it.

Input convention: one channel in [-1024, 1024] (`InputSpec.xrv`).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from stagewise.models.base import (
    Backbone,
    BackboneError,
    InputSpec,
    WeightsUnavailable,
    load_into,
    wrap_densenet,
    wrap_resnet,
)
from stagewise.models.registry import register_source
from stagewise.models.safe_pickle import RefusedPickle, load_tensors

XRV_WEIGHTS = ("resnet50-res512-all", "densenet121-res224-all")

# The classes torchxrayvision's DenseNet files are pickled with (torch's modules and
# torchxrayvision's dense blocks); they are read as data, never instantiated.
_DENSENET_CLASSES = (
    "torchxrayvision.models.DenseNet",
    "torchxrayvision.models._DenseBlock",
    "torchxrayvision.models._DenseLayer",
    "torchxrayvision.models._Transition",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.pooling.AvgPool2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.linear.Linear",
)


def _build(weights_name: str) -> Backbone:
    """The torchxrayvision network for `weights_name`, with random weights."""
    import torchvision
    import torchxrayvision as xrv

    if weights_name.startswith("resnet50"):
        # xrv.models.ResNet(weights=None) refuses to build, so build the same network.
        net = torchvision.models.resnet50(weights=None, num_classes=18)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return wrap_resnet(net, InputSpec.xrv(), f"xrv:{weights_name}")
    net = xrv.models.DenseNet(weights=None)
    return wrap_densenet(net, InputSpec.xrv(), f"xrv:{weights_name}")


def _pretrained(weights_name: str, *, weights: Path | None, cache_dir: Path | None, arch: str | None) -> Backbone:
    import torchxrayvision as xrv

    if weights_name not in XRV_WEIGHTS:
        raise BackboneError(f"torchxrayvision weights {weights_name!r} are not supported; choose one of {list(XRV_WEIGHTS)}")
    url = xrv.models.model_urls[weights_name]["weights_url"]
    folder = Path(os.path.expanduser(str(cache_dir) if cache_dir else xrv.utils.get_cache_dir()))
    target = folder / os.path.basename(url)
    if not target.is_file():
        try:  # the library's downloader (to a .part file, moved into place when complete)
            xrv.models.get_weights(weights_name, cache_dir=str(folder))
        except Exception as err:  # the library raises whatever its downloader raised
            raise WeightsUnavailable(
                f"torchxrayvision weights {weights_name!r} are not cached and could not be downloaded ({type(err).__name__}). "
                f"Download {url} and place it at {target} (or set backbone.cache_dir to the folder holding it)."
            ) from None
    try:
        state = load_tensors(target, _DENSENET_CLASSES if weights_name.startswith("densenet") else ())
    except RefusedPickle as err:
        raise WeightsUnavailable(
            f"{target} is not a torchxrayvision weights file stagewise can read: {err}. stagewise reads only tensors "
            f"from weights files and never runs code stored in one; delete the file and download it again from {url}"
        ) from None
    state.pop("op_threshs", None)  # the library's calibration buffer, not part of the trunk
    backbone = _build(weights_name)
    load_into(backbone, state, strict_head=False, source=str(target))
    backbone.net.eval()  # as torchxrayvision returns its networks
    return backbone


register_source(
    "xrv",
    archs=XRV_WEIGHTS,
    build_arch=_build,
    load_pretrained=_pretrained,
    describe=[("xrv:<weights>", "torchxrayvision, CXR-pretrained, 1 channel in [-1024, 1024]: " + ", ".join(XRV_WEIGHTS))],
)
