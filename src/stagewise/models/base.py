"""What every backbone is, whatever library it comes from, and how weights get into one.

A staged study freezes, unfreezes and assigns learning rates by *layer group* (stem,
layer1..layer4 for a ResNet), so every backbone is wrapped into the same shape: an ordered
mapping of group name -> module names, a feature size, and the input convention its weights
were trained with. Where the groups run one after another (ResNet, DenseNet) the backbone is
*sequential*: a frozen prefix can then be computed once and reused (see training.cache).

This module holds that shape (`Backbone`, `InputSpec`), the errors, and the helpers the
sources share (pooling, ResNet/DenseNet wrapping, reading a weights file, loading it into a
backbone, saving one), so that a source module depends on this one and on `registry`, and
never on another source. Nothing here knows which sources exist.

Weights files are read as tensors only: safetensors, or `torch.load(weights_only=True)`,
which refuses a pickle that would run code; see `safe_pickle` for the one published format
(a whole pickled model) that needs more.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from stagewise.models.safe_pickle import refusal
from stagewise.errors import StagewiseError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(StagewiseError, ValueError):
    """A backbone spec that cannot be built (unknown name, unreadable file)."""


class WeightsUnavailable(StagewiseError, RuntimeError):
    """Pretrained weights are neither in the library's cache nor downloadable."""


@dataclass(frozen=True)
class InputSpec:
    """How a [0, 1] grayscale image becomes this network's input: (x - mean) / std per channel.

    torchxrayvision expects [-1024, 1024], i.e. mean 0.5 and std 1/2048 on a [0, 1] image.
    """

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def imagenet(cls) -> "InputSpec":
        return cls(3, IMAGENET_MEAN, IMAGENET_STD)

    @classmethod
    def xrv(cls) -> "InputSpec":
        return cls(1, (0.5,), (1 / 2048,))

    @classmethod
    def gray(cls) -> "InputSpec":
        return cls(1, (0.5,), (0.25,))


class Backbone(nn.Module):
    """A trunk with ordered layer groups, returning pooled features of size `feature_dim`.

    `groups` maps group name -> names of submodules of `net` in execution order. For a
    sequential backbone, `forward(x, start=k)` resumes from the output of group k-1, which
    is what makes a cached frozen prefix usable, and `pool(x)` turns the last output into
    features; a non-sequential one runs whole as `pool(net, x)`.
    """

    def __init__(
        self,
        net: nn.Module,
        groups: "OrderedDict[str, list[str]]",
        feature_dim: int,
        input_spec: InputSpec,
        arch: str,
        pool: Callable | None = None,
        sequential: bool = True,
        param_names: "dict[str, list[str]] | None" = None,
    ):
        super().__init__()
        self.net = net
        self.groups = groups
        self.feature_dim = feature_dim
        self.input_spec = input_spec
        self.arch = arch
        self.sequential = sequential
        self._pool = pool
        # Parameters that belong to no listed module (a ViT's pos_embed) need names.
        self._param_names = param_names
        self.checkpoint_groups = False
        """Recompute each group's activations in backward (set by a stage with checkpointing)."""
        self.published_head: dict[str, torch.Tensor] | None = None
        """The linear head published with these weights ({weight, bias}: the BPD models'), which
        `Network.build(..., pretrained_head=True)` starts from; None for trunk-only weights."""
        self.register_buffer("_mean", torch.tensor(input_spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(input_spec.std).view(1, -1, 1, 1), persistent=False)

    @property
    def group_names(self) -> list[str]:
        return list(self.groups)

    @property
    def spatial_dims(self) -> int:
        """3 for a backbone on volumes (N, C, D, H, W), which has 3D convolutions; else 2."""
        return 3 if any(isinstance(m, nn.Conv3d) for m in self.net.modules()) else 2

    def group_modules(self, name: str) -> list[nn.Module]:
        return [self.net.get_submodule(m) for m in self.groups[name]]

    def group_parameters(self, name: str) -> list[nn.Parameter]:
        if self._param_names is not None:
            return [self.net.get_parameter(n) for n in self._param_names[name]]
        return [p for m in self.group_modules(name) for p in m.parameters()]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] one-channel images (N, 1, H, W) or volumes (N, 1, D, H, W) -> the
        normalised input the weights expect."""
        x = x.to(self._mean.dtype)
        if self.input_spec.channels != x.shape[1]:
            x = x.expand(-1, self.input_spec.channels, *x.shape[2:])
        mean, std = self._mean, self._std
        if x.dim() != mean.dim():  # (1, C, 1, 1) -> one trailing 1 per spatial dim
            mean = mean.view(1, -1, *([1] * (x.dim() - 2)))
            std = std.view(1, -1, *([1] * (x.dim() - 2)))
        return (x - mean) / std

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run groups[start:stop]; with stop=None, also pool to features."""
        if start == 0:
            x = self.prepare(x)
        if not self.sequential:
            if start != 0 or stop is not None:
                raise RuntimeError(f"{self.arch} is not sequential; it runs only whole")
            return self._pool(self.net, x)
        for g in self.group_names[start:stop]:
            if self.checkpoint_groups and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self._run_group, g, x, use_reentrant=False)
            else:
                x = self._run_group(g, x)
        return x if stop is not None else self._pool(x)

    def _run_group(self, group: str, x: torch.Tensor) -> torch.Tensor:
        for m in self.groups[group]:
            x = self.net.get_submodule(m)(x)
        return x


def pool_flat(x: torch.Tensor) -> torch.Tensor:
    """Global average over all spatial dims: (N, C, H, W) or (N, C, D, H, W) -> (N, C)."""
    if x.dim() == 5:
        return torch.flatten(nn.functional.adaptive_avg_pool3d(x, 1), 1)
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def pool_relu_flat(x: torch.Tensor) -> torch.Tensor:
    """ReLU, then global average pooling (DenseNet features end in a norm, not an activation)."""
    return pool_flat(nn.functional.relu(x))


def wrap_resnet(net: nn.Module, input_spec: InputSpec, arch: str) -> Backbone:
    """torchvision-layout ResNet groups: stem (conv1, bn1, relu, maxpool), layer1..layer4;
    the classifier `fc` is removed."""
    groups = OrderedDict(stem=["conv1", "bn1", "relu", "maxpool"])
    for i in range(1, 5):
        groups[f"layer{i}"] = [f"layer{i}"]
    net.fc = nn.Identity()
    return Backbone(net, groups, net.layer4[-1].conv1.in_channels, input_spec, arch, pool_flat)


def wrap_densenet(net: nn.Module, input_spec: InputSpec, arch: str, classifier: str = "classifier") -> Backbone:
    """DenseNet groups (torchvision, torchxrayvision, MONAI): stem, then each dense block with
    the transition that follows it, the last with the final norm; features are ReLU + global
    average pooling, and the library's classifier (`classifier`) is removed."""
    groups = OrderedDict(stem=["features.conv0", "features.norm0", "features.relu0", "features.pool0"])
    for i in range(1, 5):
        members = [f"features.denseblock{i}"]
        members.append(f"features.transition{i}" if i < 4 else "features.norm5")
        groups[f"block{i}"] = members
    dim = net.features.norm5.num_features
    setattr(net, classifier, nn.Identity())
    return Backbone(net, groups, dim, input_spec, arch, pool_relu_flat)


def set_in_chans(net: nn.Module, first_conv: str, channels: int) -> None:
    """Replace the 2D convolution `first_conv` by a freshly initialised one taking `channels`."""
    old = net.get_submodule(first_conv)
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    parent, _, leaf = first_conv.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch state dict file (never code: a pickle that
    names anything but tensors and containers is refused)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneError(f"{path}: not a readable weights file ({type(err).__name__}: {refusal(err)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def load_into(backbone: Backbone, state: dict, strict_head: bool, source: str) -> None:
    """Load trunk weights; a classifier in the file (fc/classifier) is ignored unless strict.
    Missing, unexpected or differently shaped tensors are a BackboneError naming `source`."""
    if not strict_head:
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    try:
        missing, unexpected = backbone.net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches are raised even with strict=False
        shapes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise BackboneError(
            f"{source}: weights do not fit {backbone.arch}: "
            + ("; ".join(shapes[:3]) + ("..." if len(shapes) > 3 else "") if shapes else _first_line(err))
        ) from None
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or unexpected:
        raise BackboneError(
            f"{source}: weights do not fit {backbone.arch}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def save_backbone(backbone: Backbone, path: str | Path) -> Path:
    """Save trunk weights as safetensors with the metadata `file:` needs to rebuild it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in backbone.net.state_dict().items()}
    meta = {"stagewise_arch": backbone.arch, "input_spec": repr(asdict(backbone.input_spec))}
    save_file(state, str(path), metadata=meta)
    return path


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
