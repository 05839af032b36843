"""`file:<path>` and `run:<run-dir>[#arm]`: backbones saved to disk, rebuilt and loaded;
and whole networks (backbone + head) saved and loaded the same way.

A backbone saved by stagewise (`save_backbone`: safetensors with its `stagewise_arch` in the
metadata; a study's pretrained/ folder; an exported bundle) is rebuilt from that
architecture through the registry and its weights loaded strictly; a checkpoint in a layout
a source registered (`registry.register_checkpoint_format`: the BPD models') is mapped by that
source, head included; a plain state dict (.pth/.pt, read with weights_only=True) needs
`arch`. Weights that do not fit the architecture (missing, unexpected or differently shaped
tensors) are an error naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from stagewise.models.base import Backbone, BackboneError, load_into, load_state_file
from stagewise.models.heads import Network
from stagewise.models.registry import build_arch, checkpoint_formats, register_source
from stagewise.models.safe_pickle import RefusedPickle, load_checkpoint


def file_backbone(path: Path, arch: str | None = None) -> Backbone:
    """The backbone saved at `path`; `arch` names the architecture of a plain state dict."""
    if not path.is_file():
        raise BackboneError(f"backbone file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as err:
            raise BackboneError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
        arch = arch or meta.get("stagewise_arch")
    else:
        known = _registered_layout(path, arch)
        if known is not None:
            return known
    if arch is None:
        raise BackboneError(f"{path}: the architecture is unknown; set backbone.arch (e.g. 'torchvision:resnet50')")
    backbone = build_arch(arch)
    load_into(backbone, load_state_file(path), strict_head=True, source=str(path))
    return backbone


def _registered_layout(path: Path, arch: str | None) -> Backbone | None:
    """A torch checkpoint in a layout a source registered (the BPD models'), with its head;
    None for anything else (a plain state dict is then read as one, a second read)."""
    formats = checkpoint_formats()
    try:
        obj = load_checkpoint(path, [c for f in formats for c in f.data_classes])
    except RefusedPickle:
        return None  # load_state_file says why the file cannot be read
    for fmt in formats:
        backbone = fmt.convert(obj, str(path))
        if backbone is not None:
            if arch is not None and arch != backbone.arch:
                raise BackboneError(f"{path}: a {fmt.name} checkpoint of {backbone.arch}, not {arch}; "
                                    "remove backbone.arch (the file says what it is)")
            return backbone
    return None


def pretrained_in_run(spec: str) -> Path:
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


def save_network(net: Network, path: str | Path) -> Path:
    """Whole network (backbone + head) as safetensors, with what `load_network` needs to
    rebuild it: the backbone's architecture and the head's shape."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    layers = net.head.layers
    head = {"dropout": layers[0].p, "hidden": layers[1].out_features if len(layers) > 2 else None}
    meta = {"stagewise_arch": net.backbone.arch, "head": json.dumps(head),
            "n_outputs": str(layers[-1].out_features), "n_extra": str(net.n_extra)}
    save_file(state, str(path), metadata=meta)
    return path


def load_network(path: str | Path) -> Network:
    """A network saved by `save_network`, in eval mode; anything else is a BackboneError."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: no saved model")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise BackboneError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    if "stagewise_arch" not in meta or "head" not in meta:
        raise BackboneError(f"{path}: not a network saved by stagewise (metadata missing)")
    head = json.loads(meta["head"])
    net = Network.build(build_arch(meta["stagewise_arch"]), int(meta["n_outputs"]), int(meta.get("n_extra", 0)),
                        dropout=head["dropout"], hidden=head.get("hidden"))
    state = load_state_file(path)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise BackboneError(f"{path}: weights do not fit {meta['stagewise_arch']} ({str(err)[:300]})") from None
    return net.eval()


def _from_file(name: str, *, weights: Path | None, cache_dir: Path | None, arch: str | None) -> Backbone:
    return file_backbone(Path(os.path.expanduser(name)), arch)


def _from_run(name: str, *, weights: Path | None, cache_dir: Path | None, arch: str | None) -> Backbone:
    return file_backbone(pretrained_in_run(name), arch)


register_source(
    "file",
    build_arch=None,
    load_pretrained=_from_file,
    describe=[("file:<path>", "safetensors saved by stagewise, a checkpoint in a registered layout (BPD models), "
                               "or a state dict with backbone.arch")],
)
register_source(
    "run",
    build_arch=None,
    load_pretrained=_from_run,
    describe=[("run:<run-dir>[#<arm>]", "a backbone pretrained by an earlier study's pretrain/ssl stages")],
)
