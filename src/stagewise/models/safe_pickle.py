"""Reading a weights file that is a whole pickled network, without running code from it.

A .pt/.pth file is a pickle, and unpickling calls whatever the file names, so a file placed
in a weights cache would run arbitrary code the moment a library loads it with
`weights_only=False` (torchxrayvision does, for its DenseNets). stagewise therefore never lets
a library unpickle a weights file: state dicts are read with `torch.load(weights_only=True)`
(see `base.load_state_file`), and this module reads the one other published format, a whole
pickled `nn.Module`, as data.

The network classes a file may name are given by their full names; they are never imported
or instantiated. Each is replaced by an inert `_ModuleRecord` that keeps the pickled
attributes, and only the tensors under `_parameters` / `_buffers` / `_modules` are kept, in
`state_dict()` order. Files in the current (zip) format go through torch's weights-only
unpickler with those records allow-listed; files in the pre-1.6 format, which that unpickler
cannot read when they hold a module (they store each module class as a persistent id),
go through a restricted unpickler that resolves only the records and the few tensor-rebuild
functions below. Anything else the file names is refused, and the error says what.
"""

from __future__ import annotations

import pickle
import re
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Collection
from pathlib import Path

import torch

from stagewise.errors import StagewiseError


class RefusedPickle(StagewiseError, pickle.UnpicklingError):
    """A weights file that holds, or would need to run, more than tensors and containers."""


class _ModuleRecord:
    """Stands in for a class named in a pickle (an nn.Module, or a training script's config
    object); keeps its attributes as data."""

    dump_patches = False  # read by torch's legacy loader when it compares module sources

    def __setstate__(self, state) -> None:
        self.__dict__["pickled"] = state


def _no_backend() -> None:
    """Modules pickled by torch < 1.2 carry their (long gone) THNN backend; it is dropped."""
    return None


# Everything a pre-1.6 state dict or pickled module needs besides its module classes.
_LEGACY_GLOBALS = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "__builtin__.set": set,  # protocol 2 writes Python 2 names
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch.nn.backends.thnn._get_thnn_function_backend": _no_backend,
}


def load_tensors(path: str | Path, module_classes: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a pickled state dict, or of a whole pickled network whose module classes
    are among `module_classes` (full names, e.g. 'torch.nn.modules.conv.Conv2d').

    Raises RefusedPickle, saying why, for anything else (including a file that would run code).
    """
    path = Path(path)
    try:
        obj = _weights_only(path, module_classes)
    except pickle.UnpicklingError as err:
        if zipfile.is_zipfile(path):
            raise RefusedPickle(refusal(err)) from None
        obj = _load_legacy(path, module_classes)
    except Exception as err:  # truncated, empty, not a torch file at all
        raise RefusedPickle(f"not a readable weights file ({type(err).__name__}: {refusal(err)[:200]})") from None
    return _tensors(obj)


def load_checkpoint(path: str | Path, data_classes: Collection[str] = ()) -> object:
    """What a torch checkpoint file holds (a dict of state dicts, numbers, strings), read by
    torch's weights-only unpickler. Objects of `data_classes` (full names, e.g. the
    `__main__.ModelConfig` a training script pickled beside its weights) come back as inert
    records of their attributes: the class is never imported or run. Anything else that is
    not tensors or containers is refused (RefusedPickle, saying what)."""
    path = Path(path)
    try:
        return _weights_only(path, data_classes)
    except pickle.UnpicklingError as err:
        raise RefusedPickle(refusal(err)) from None
    except Exception as err:  # truncated, empty, not a torch file at all
        raise RefusedPickle(f"not a readable weights file ({type(err).__name__}: {refusal(err)[:200]})") from None


def _weights_only(path: Path, class_names: Collection[str]):
    """torch.load(weights_only=True) with `class_names` allow-listed as `_ModuleRecord`s."""
    with torch.serialization.safe_globals([(_ModuleRecord, name) for name in class_names]):
        return torch.load(path, map_location="cpu", weights_only=True)


def refusal(err: BaseException) -> str:
    """The reason in a weights-only loader's error (torch's, timm's), without the advice to
    load the file unsafely that those errors carry."""
    boilerplate = ("Weights only load failed", "Check the documentation", "(1)", "(2)", "Please file an issue")
    lines = [ln.strip() for ln in str(err).splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith(boilerplate)]
    if not kept:  # the reason may follow "Please file an issue ...: WeightsUnpickler error:"
        kept = [ln.partition("WeightsUnpickler error:")[2].strip() for ln in lines if "WeightsUnpickler error:" in ln]
    sentences = re.split(r"(?<=\.)\s+", " ".join(k for k in kept if k))
    advice = ("weights_only=False", "safe_globals", "trust", "No automatic")
    reason = " ".join(x for x in sentences if x and not any(a in x for a in advice))
    return reason.removeprefix("WeightsUnpickler error: ").rstrip(".") or type(err).__name__


def _load_legacy(path: Path, module_classes: Collection[str]):
    allowed = {**_LEGACY_GLOBALS, **{name: _ModuleRecord for name in module_classes}}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            try:
                return allowed[f"{module}.{name}"]
            except KeyError:
                raise RefusedPickle(f"refused to load {module}.{name}: a weights file needs no such global") from None

    def load(f, **kwargs):
        return Unpickler(f, **kwargs).load()

    restricted = types.SimpleNamespace(__name__="stagewise.models.safe_pickle", Unpickler=Unpickler, load=load)
    try:
        with warnings.catch_warnings():  # torch compares each module's saved source with the record's
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted)
    except RefusedPickle:
        raise
    except Exception as err:
        raise RefusedPickle(f"not a readable weights file ({type(err).__name__}: {str(err)[:200]})") from None


def _tensors(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, _ModuleRecord):
        out: dict[str, torch.Tensor] = {}
        _collect(obj, "", out, set())
        return out
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return {k: v.detach() for k, v in obj.items()}
    raise RefusedPickle(f"holds a {type(obj).__name__}, not a state dict or a pickled network")


def _collect(record: _ModuleRecord, prefix: str, out: dict, seen: set[int]) -> None:
    """Parameters, persistent buffers, then submodules, as nn.Module.state_dict orders them."""
    seen.add(id(record))
    attrs = record.__dict__.get("pickled")
    if not isinstance(attrs, dict):
        raise RefusedPickle(f"module {prefix or '<root>'} has no attribute dict")
    skip = attrs.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        entries = attrs.get(kind) or {}
        if not isinstance(entries, dict):
            raise RefusedPickle(f"{prefix}{kind} is a {type(entries).__name__}")
        for name, value in entries.items():
            if value is None or (kind == "_buffers" and isinstance(skip, set) and name in skip):
                continue
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise RefusedPickle(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value.detach()
    children = attrs.get("_modules") or {}
    if not isinstance(children, dict):
        raise RefusedPickle(f"{prefix}_modules is a {type(children).__name__}")
    for name, child in children.items():
        if child is None:
            continue
        if not isinstance(child, _ModuleRecord) or id(child) in seen or not isinstance(name, str):
            raise RefusedPickle(f"submodule {prefix}{name} is not a module of the allowed classes")
        _collect(child, f"{prefix}{name}.", out, seen)
