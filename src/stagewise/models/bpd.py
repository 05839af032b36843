"""`bpd:<model>`: the BPD paper's published ResNet-50 models (github.com/phflot/bpdneo-cxr),
backbone and head, as a starting point for a site: probe or thaw them on local data, or
score local patients with them as they are.

The authors publish four models trained on their whole cohort. Each file is a torch
checkpoint `{"model_state_dict": ...}` of their `BPDModel` wrapper: the torchxrayvision
ResNet under `base_model` (its torchvision network at `base_model.model.*`; for the ImageNet
model the torchvision ResNet itself at `base_model.*`), the same modules again under
`inner_model.*` (the wrapper keeps a second reference to them), and the head
Dropout(0.1) -> Linear(2048 -> 1) at `fc.*`. stagewise maps those keys onto its own
architectures, `xrv:resnet50-res512-all` (1 channel in [-1024, 1024]) and
`torchvision:resnet50` (ImageNet convention), so the conformance suite's guarantees hold
for them, and keeps the head as `Backbone.published_head`. Every key of the file must be
used: a missing, unexpected or differently shaped tensor is an error naming it.

The files are read by torch's weights-only unpickler; the authors' loader also allows a
pickled `__main__.ModelConfig`, which is read here as inert data and ignored. Files live
where the authors' own downloader puts them (`~/.bpdneo/models/<model>.pth`), or in
`backbone.cache_dir`, or at `backbone.weights`; a missing file is downloaded once with
torch.hub's downloader, and offline the error names the URL and the exact path. The layout
is also registered for `file:`, so `file:/path/to/any-such.pth` loads without `arch`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stagewise.models.base import Backbone, BackboneError, WeightsUnavailable, load_into
from stagewise.models.registry import build_arch, register_checkpoint_format, register_source
from stagewise.models.safe_pickle import RefusedPickle, load_checkpoint

BPD_MODELS = {
    # name: (file id on the authors' share, stagewise architecture, what it is)
    "bpd_xrv_progfreeze_lp_cutmix": ("nLYMSE8jRSg3j8j", "xrv:resnet50-res512-all",
                                     "CXR-pretrained, linear probe + progressive freezing + CutMix (best arm)"),
    "bpd_xrv_progfreeze": ("SRxGJzLSpEMMAD4", "xrv:resnet50-res512-all", "CXR-pretrained, progressive freezing"),
    "bpd_rgb_progfreeze": ("W7EmnFDSFwoFSBL", "torchvision:resnet50", "ImageNet-pretrained, progressive freezing"),
    "bpd_xrv_fullft": ("w2czAo4oYxFaAGi", "xrv:resnet50-res512-all", "CXR-pretrained, full fine-tuning"),
}
DOWNLOAD_URL = "https://cloud.hiz-saarland.de/public.php/dav/files/{file_id}"
DEFAULT_FOLDER = "~/.bpdneo/models"
"""Where the authors' `download_model_weights` saves the files, so a site that used it has them."""

DATA_CLASSES = ("__main__.ModelConfig",)
"""The training script's config class the authors' loader allows beside the tensors."""

_XRV_PREFIX, _TV_PREFIX, _ALIAS = "base_model.model.", "base_model.", "inner_model."
_IGNORED = ("base_model.op_threshs",)
"""torchxrayvision's calibration buffer for its own 18 labels: not part of the trunk or head."""


def bpd_state(obj: object) -> dict | None:
    """The state dict of a BPD checkpoint (as `load_checkpoint` read it), or None when the
    object is not one (the authors' loader takes `model_state_dict`, `state_dict` or the
    dict itself; the layout is recognised by its head `fc.*` and trunk `base_model.*`)."""
    if not isinstance(obj, dict):
        return None
    state = obj.get("model_state_dict") or obj.get("state_dict") or obj
    if not isinstance(state, dict) or "fc.weight" not in state:
        return None
    if not any(isinstance(k, str) and k.startswith(_TV_PREFIX) for k in state):
        return None
    return state


def map_bpd_state(state: dict, source: str) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(architecture, trunk state dict in stagewise's keys, head {weight, bias}) of a BPD
    state dict. `inner_model.*` must repeat the trunk exactly (the wrapper's second reference
    to the same modules); a key that is neither trunk, alias, head nor the ignored xrv buffer
    is an error, so that nothing in the file goes unused."""
    xrv = any(k.startswith(_XRV_PREFIX) for k in state)
    prefix, arch = (_XRV_PREFIX, "xrv:resnet50-res512-all") if xrv else (_TV_PREFIX, "torchvision:resnet50")
    trunk = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    alias = {k[len(_ALIAS):]: v for k, v in state.items() if k.startswith(_ALIAS)}
    if alias and (alias.keys() != trunk.keys() or any(not torch.equal(alias[k], trunk[k]) for k in trunk)):
        differ = sorted(alias.keys() ^ trunk.keys()) or [k for k in trunk if not torch.equal(alias[k], trunk[k])]
        raise BackboneError(f"{source}: inner_model.* does not repeat {prefix}* (first differences: {differ[:3]}); "
                            "the file is not a BPDModel checkpoint as the authors save it")
    if "fc.bias" not in state:
        raise BackboneError(f"{source}: BPD checkpoint without fc.bias (the head's bias)")
    head = {"weight": state["fc.weight"].detach().clone().float(), "bias": state["fc.bias"].detach().clone().float()}
    used = {*(prefix + k for k in trunk), *(_ALIAS + k for k in alias), "fc.weight", "fc.bias", *_IGNORED}
    unexpected = sorted(k for k in state if k not in used)
    if unexpected:
        raise BackboneError(f"{source}: unexpected tensors in a BPD checkpoint: {unexpected[:5]}"
                            f"{'...' if len(unexpected) > 5 else ''}")
    return arch, trunk, head


def backbone_from_checkpoint(obj: object, source: str, expected: str | None = None) -> Backbone | None:
    """A Backbone with the trunk and `published_head` of a BPD checkpoint, or None if `obj`
    is not one; `expected` is the architecture a named model must have. Registered as a
    checkpoint format, so `file:` uses it too."""
    state = bpd_state(obj)
    if state is None:
        return None
    arch, trunk, head = map_bpd_state(state, source)
    if expected is not None and arch != expected:
        raise BackboneError(f"{source}: holds a {arch} model, but the named model is {expected}; "
                            "is the file another model's?")
    backbone = build_arch(arch)
    load_into(backbone, trunk, strict_head=True, source=source)
    if tuple(head["weight"].shape) != (1, backbone.feature_dim):
        raise BackboneError(f"{source}: the head maps {tuple(head['weight'].shape)}; a BPD head is "
                            f"Linear({backbone.feature_dim} -> 1)")
    backbone.published_head = head
    backbone.net.eval()
    return backbone


def model_path(name: str, cache_dir: Path | None) -> Path:
    folder = Path(os.path.expanduser(str(cache_dir) if cache_dir else DEFAULT_FOLDER))
    return folder / f"{name}.pth"


def _build(name: str) -> Backbone:
    """The architecture of a published model, with random weights (what checks build)."""
    return build_arch(_model(name)[1])


def _model(name: str) -> tuple[str, str, str]:
    if name not in BPD_MODELS:
        raise BackboneError(f"BPD model {name!r} is not published; choose one of {list(BPD_MODELS)}")
    return BPD_MODELS[name]


def _pretrained(name: str, *, weights: Path | None, cache_dir: Path | None, arch: str | None) -> Backbone:
    file_id, expected, _ = _model(name)
    url = DOWNLOAD_URL.format(file_id=file_id)
    target = Path(weights) if weights is not None else model_path(name, cache_dir)
    if not target.is_file():
        if weights is not None:
            raise WeightsUnavailable(f"backbone.weights {target} does not exist; download {url} (BPD model {name}) "
                                     f"and place it there")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target), progress=False)  # to a temp file, moved when complete
        except Exception as err:
            raise WeightsUnavailable(
                f"BPD model {name!r} is not at {target} and could not be downloaded ({type(err).__name__}). "
                f"Download {url} and place it at {target} (the authors' bpd_torch download_model_weights "
                f"puts it there too), or set backbone.weights to a local copy."
            ) from None
    try:
        obj = load_checkpoint(target, DATA_CLASSES)
    except RefusedPickle as err:
        raise WeightsUnavailable(
            f"{target} is not a BPD model file stagewise can read: {err}. stagewise reads only tensors from weights "
            f"files and never runs code stored in one; delete the file and download it again from {url}"
        ) from None
    backbone = backbone_from_checkpoint(obj, str(target), expected)
    if backbone is None:
        raise BackboneError(f"{target}: not a BPD model checkpoint ({{'model_state_dict': ...}} with base_model.* "
                            f"and fc.* keys); download {url} again")
    return backbone


register_source(
    "bpd",
    archs=(),  # the architectures are xrv:resnet50-res512-all and torchvision:resnet50, covered under those names
    build_arch=_build,
    load_pretrained=_pretrained,
    describe=[("bpd:<model>", "the BPD paper's published ResNet-50 models, backbone + head (head.pretrained): "
               + ", ".join(BPD_MODELS))],
    with_head=True,
)
register_checkpoint_format("bpd", convert=backbone_from_checkpoint, data_classes=DATA_CLASSES)
