"""Backbone registry: pretrained trunks with named, ordered layer groups.

A staged study freezes, unfreezes and assigns learning rates by *layer group* (stem,
layer1..layer4 for a ResNet), so every backbone, whatever library it comes from, is
wrapped into the same shape: an ordered mapping of group name -> module names, a feature
size, and the input convention its weights were trained with. Where the groups run one
after another (ResNet, DenseNet) the backbone is *sequential*: a frozen prefix can then be
computed once and reused (see training.cache).

Weights are always obtained through the source library's own download and cache, so a
user with internet gets the published file; offline, a missing file is reported with the
exact path where it must be placed.

3D backbones for volumes (N, 1, D, H, W), e.g. brain MRI, come from MONAI (`monai:<arch>`,
see models.volumes); they have the same groups and run through the same stages.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from stagewise.recipe import BackboneConfig

SOURCES = ("xrv", "torchvision", "timm", "scratch", "monai", "file", "dual", "run")
_TV_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "densenet121", "densenet169", "densenet201")
_XRV_WEIGHTS = ("resnet50-res512-all", "densenet121-res224-all")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(ValueError):
    """A backbone spec that cannot be built (unknown name, unreadable file)."""


class WeightsUnavailable(RuntimeError):
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


def _pool_flat(x: torch.Tensor) -> torch.Tensor:
    """Global average over all spatial dims: (N, C, H, W) or (N, C, D, H, W) -> (N, C)."""
    if x.dim() == 5:
        return torch.flatten(nn.functional.adaptive_avg_pool3d(x, 1), 1)
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _pool_relu_flat(x: torch.Tensor) -> torch.Tensor:
    return _pool_flat(nn.functional.relu(x))


def _wrap_resnet(net: nn.Module, input_spec: InputSpec, arch: str) -> Backbone:
    groups = OrderedDict(stem=["conv1", "bn1", "relu", "maxpool"])
    for i in range(1, 5):
        groups[f"layer{i}"] = [f"layer{i}"]
    net.fc = nn.Identity()
    return Backbone(net, groups, net.layer4[-1].conv1.in_channels, input_spec, arch, _pool_flat)


def _wrap_densenet(net: nn.Module, input_spec: InputSpec, arch: str, classifier: str = "classifier") -> Backbone:
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
    return Backbone(net, groups, dim, input_spec, arch, _pool_relu_flat)


def _set_in_chans(net: nn.Module, first_conv: str, channels: int) -> None:
    old = net.get_submodule(first_conv)
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    parent, _, leaf = first_conv.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)


def _torchvision_arch(name: str, channels: int) -> Backbone:
    import torchvision

    if name not in _TV_ARCHS:
        raise BackboneError(f"torchvision architecture {name!r} is not supported; choose one of {list(_TV_ARCHS)}")
    net = torchvision.models.get_model(name, weights=None)
    spec = InputSpec.imagenet() if channels == 3 else InputSpec.gray()
    if name.startswith("resnet"):
        if channels != 3:
            _set_in_chans(net, "conv1", channels)
        return _wrap_resnet(net, spec, f"torchvision:{name}")
    if channels != 3:
        _set_in_chans(net, "features.conv0", channels)
    return _wrap_densenet(net, spec, f"torchvision:{name}")


def _xrv_arch(weights_name: str) -> Backbone:
    """The torchxrayvision network for `weights_name`, with random weights."""
    import torchvision
    import torchxrayvision as xrv

    if weights_name.startswith("resnet50"):
        # xrv.models.ResNet(weights=None) refuses to build, so build the same network.
        net = torchvision.models.resnet50(weights=None, num_classes=18)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return _wrap_resnet(net, InputSpec.xrv(), f"xrv:{weights_name}")
    net = xrv.models.DenseNet(weights=None)
    return _wrap_densenet(net, InputSpec.xrv(), f"xrv:{weights_name}")


def _xrv_pretrained(weights_name: str, cache_dir: Path | None) -> Backbone:
    import torchxrayvision as xrv

    if weights_name not in _XRV_WEIGHTS:
        raise BackboneError(f"torchxrayvision weights {weights_name!r} are not supported; choose one of {list(_XRV_WEIGHTS)}")
    url = xrv.models.model_urls[weights_name]["weights_url"]
    folder = Path(os.path.expanduser(str(cache_dir) if cache_dir else xrv.utils.get_cache_dir()))
    target = folder / os.path.basename(url)
    try:
        if weights_name.startswith("resnet"):
            model = xrv.models.ResNet(weights=weights_name, cache_dir=str(folder))
            net = model.model
        else:
            model = xrv.models.DenseNet(weights=weights_name, cache_dir=str(folder))
            net = model
    except Exception as err:  # the library raises whatever its downloader raised
        if target.is_file():
            raise WeightsUnavailable(f"torchxrayvision could not load {target}: {err}. The file may be damaged; delete it and download it again from {url}") from None
        raise WeightsUnavailable(
            f"torchxrayvision weights {weights_name!r} are not cached and could not be downloaded ({type(err).__name__}). "
            f"Download {url} and place it at {target} (or set backbone.cache_dir to the folder holding it)."
        ) from None
    wrap = _wrap_resnet if weights_name.startswith("resnet") else _wrap_densenet
    return wrap(net, InputSpec.xrv(), f"xrv:{weights_name}")


def _torchvision_pretrained(name: str, cfg: BackboneConfig) -> Backbone:
    import torchvision

    arch, _, tag = name.partition(".")
    backbone = _torchvision_arch(arch, 3)
    if cfg.weights is not None:
        state = _load_state_file(cfg.weights)
    else:
        enum = torchvision.models.get_model_weights(arch)
        weights = enum[tag] if tag else enum.DEFAULT
        folder = Path(cfg.cache_dir) if cfg.cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
        target = folder / os.path.basename(weights.url)
        try:
            state = torch.hub.load_state_dict_from_url(weights.url, model_dir=str(folder), progress=False, weights_only=True)
        except Exception as err:
            raise WeightsUnavailable(
                f"torchvision weights {weights} are not cached and could not be downloaded ({type(err).__name__}). "
                f"Download {weights.url} and place it at {target}, or set backbone.weights to a local copy."
            ) from None
    _load_into(backbone, state, strict_head=False, source=str(cfg.weights or name))
    return backbone


def _timm_backbone(name: str, cfg: BackboneConfig, pretrained: bool) -> Backbone:
    import timm
    from timm.models import group_modules, group_parameters

    kwargs: dict = dict(num_classes=0)
    if pretrained and cfg.weights is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(cfg.weights))
    if cfg.cache_dir is not None:
        kwargs["cache_dir"] = str(cfg.cache_dir)
    if not pretrained:
        kwargs["in_chans"] = 1
    try:
        net = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise BackboneError(f"timm has no model {name!r} (see timm.list_models())") from None
        raise _timm_unavailable(name, err) from None
    except Exception as err:
        raise _timm_unavailable(name, err) from None
    matcher = net.group_matcher(coarse=True)
    modules_by_index = group_modules(net, matcher)
    params_by_index = group_parameters(net, matcher)
    groups, param_names = OrderedDict(), {}
    for i, idx in enumerate(sorted(params_by_index)):
        name = "stem" if i == 0 else f"block{i}"
        groups[name] = _outermost(modules_by_index.get(idx, []))
        param_names[name] = params_by_index[idx]
    if pretrained:
        pc = net.pretrained_cfg
        spec = InputSpec(3, tuple(pc.get("mean", IMAGENET_MEAN)), tuple(pc.get("std", IMAGENET_STD)))
    else:
        spec = InputSpec.gray()

    return Backbone(net, groups, net.num_features, spec, f"timm:{name}", _timm_features, sequential=False,
                    param_names=param_names)


def _timm_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits features of a timm model. It takes the net as an argument (no closure)
    so that a deep copy of the backbone runs its own copied weights."""
    return net.forward_head(net.forward_features(x), pre_logits=True)


def _outermost(names: list[str]) -> list[str]:
    """Module names with those nested inside another listed module removed."""
    names = sorted(set(names))
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _timm_unavailable(name: str, err: Exception) -> WeightsUnavailable:
    from huggingface_hub.constants import HF_HUB_CACHE

    return WeightsUnavailable(
        f"timm weights for {name!r} could not be loaded ({type(err).__name__}: {str(err)[:200]}). Offline, "
        f"put the Hugging Face snapshot under {HF_HUB_CACHE} and set HF_HUB_OFFLINE=1, or set backbone.weights "
        "to a local .safetensors/.pth file of that model."
    )


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneError(f"{path}: not a readable weights file ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def _load_into(backbone: Backbone, state: dict, strict_head: bool, source: str) -> None:
    """Load trunk weights; a classifier in the file (fc/classifier) is ignored unless strict."""
    if not strict_head:
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    missing, unexpected = backbone.net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or unexpected:
        raise BackboneError(
            f"{source}: weights do not fit {backbone.arch}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def build_arch(arch: str) -> Backbone:
    """A backbone of architecture `arch` (e.g. 'torchvision:resnet50', 'xrv:resnet50-res512-all',
    'timm:resnet18', 'scratch:resnet18', 'monai:resnet18') with random weights and the same
    input convention."""
    source, _, name = arch.partition(":")
    if source == "xrv":
        return _xrv_arch(name)
    if source == "torchvision":
        return _torchvision_arch(name.partition(".")[0], 3)
    if source == "timm":
        return _timm_backbone(name, BackboneConfig(name=arch), pretrained=False)
    if source == "scratch":
        return _scratch(name)
    if source == "monai":
        from stagewise.models.volumes import monai_arch

        return monai_arch(name)
    if source == "dual":
        return _dual(name, build_arch)
    raise BackboneError(f"unknown architecture {arch!r}")


def _dual(inner: str, make) -> Backbone:
    """Two independently initialised copies of `inner` (e.g. dual:scratch:tinycnn)."""
    from stagewise.models.tiny import DualBackbone

    return DualBackbone(make(inner), make(inner))


def _scratch(name: str) -> Backbone:
    """Random init for a one-channel input; `scratch:timm:<name>` for a timm model."""
    if name.startswith("timm:"):
        return _timm_backbone(name[5:], BackboneConfig(name=name), pretrained=False)
    if name.startswith("tinycnn"):
        from stagewise.models.tiny import tiny_cnn

        return tiny_cnn(name)
    b = _torchvision_arch(name, 1)
    b.arch = f"scratch:{name}"
    return b


def save_backbone(backbone: Backbone, path: str | Path) -> Path:
    """Save trunk weights as safetensors with the metadata `file:` needs to rebuild it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in backbone.net.state_dict().items()}
    meta = {"stagewise_arch": backbone.arch, "input_spec": repr(asdict(backbone.input_spec))}
    save_file(state, str(path), metadata=meta)
    return path


def _file_backbone(path: Path, cfg: BackboneConfig) -> Backbone:
    if not path.is_file():
        raise BackboneError(f"backbone file {path} does not exist")
    arch = cfg.arch
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        arch = arch or meta.get("stagewise_arch")
    if arch is None:
        raise BackboneError(f"{path}: the architecture is unknown; set backbone.arch (e.g. 'torchvision:resnet50')")
    backbone = build_arch(arch)
    _load_into(backbone, _load_state_file(path), strict_head=True, source=str(path))
    return backbone


def create_backbone(cfg: BackboneConfig | str) -> Backbone:
    """Build the backbone a recipe names, loading its weights through the source library."""
    if isinstance(cfg, str):
        cfg = BackboneConfig(name=cfg)
    source, _, name = cfg.name.partition(":")
    if source not in SOURCES:
        raise BackboneError(f"backbone {cfg.name!r}: unknown source {source!r}; choose one of {list(SOURCES)}")
    if source == "xrv":
        return _xrv_pretrained(name, cfg.cache_dir)
    if source == "torchvision":
        return _torchvision_pretrained(name, cfg)
    if source == "timm":
        return _timm_backbone(name, cfg, pretrained=True)
    if source == "scratch":
        return _scratch(name)
    if source == "monai":
        from stagewise.models.volumes import monai_backbone

        return monai_backbone(name, cfg)
    if source == "dual":
        return _dual(name, lambda spec: create_backbone(cfg.model_copy(update={"name": spec})))
    if source == "run":
        return _file_backbone(_pretrained_in_run(name), cfg)
    return _file_backbone(Path(os.path.expanduser(name)), cfg)


def _pretrained_in_run(spec: str) -> Path:
    """`run:<run-dir>` or `run:<run-dir>#<arm>`: a backbone an earlier study pretrained."""
    folder, _, arm = spec.partition("#")
    found = sorted((Path(os.path.expanduser(folder)) / "pretrained").glob(f"{arm or '*'}-*.safetensors"))
    if arm:
        found = [p for p in found if p.stem.rsplit("-", 1)[0] == arm]
    if len(found) != 1:
        names = sorted(p.stem.rsplit("-", 1)[0] for p in (Path(os.path.expanduser(folder)) / "pretrained").glob("*.safetensors"))
        raise BackboneError(
            f"run:{spec}: expected one pretrained backbone, found {len(found)}"
            + (f"; name the arm with run:{folder}#ARM (arms: {names})" if names else f"; {folder} holds no pretrained/ backbones")
        )
    return found[0]


def describe_sources() -> list[tuple[str, str]]:
    return [
        ("xrv:<weights>", "torchxrayvision, CXR-pretrained, 1 channel in [-1024, 1024]: " + ", ".join(_XRV_WEIGHTS)),
        ("torchvision:<arch>[.<WEIGHTS>]", "ImageNet weights via torchvision: " + ", ".join(_TV_ARCHS)),
        ("timm:<name>", "timm model with pretrained=True; groups from timm's group_matcher"),
        ("scratch:<arch>", "random init, 1 channel: torchvision archs, tinycnn[-W1-W2-W3-W4] (~15k params) or scratch:timm:<name>"),
        ("monai:<arch>", "3D, for NIfTI volumes; MONAI network, random init (or backbone.weights), 1 channel: "
         + ", ".join(_monai_archs()) + " (densenet121: image_size >= 32)"),
        ("run:<run-dir>[#<arm>]", "a backbone pretrained by an earlier study's pretrain/ssl stages"),
        ("dual:<spec>", "two copies of a backbone for dual-input-output training (e.g. dual:scratch:tinycnn)"),
        ("file:<path>", "safetensors saved by stagewise, or a state dict with backbone.arch"),
    ]


def _monai_archs() -> tuple[str, ...]:
    from stagewise.models.volumes import MONAI_ARCHS

    return MONAI_ARCHS
