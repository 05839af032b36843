"""The backbone sources a recipe can name (`xrv:`, `torchvision:`, `file:`...), in one table.

Each source lives in its own module, which registers itself here once, when imported (see
`models/__init__.py`); this module knows none of them. Everything that dispatches on a
source, lists sources or names them in an error reads this table, so adding a source is
adding one file. Modelled on timm's `_registry.py`.

A source gives:
- `archs`: the concrete architectures it can build (for `list_archs`, which the
  conformance tests run over); a source that needs a file (`file:`, `run:`) has none;
- `build_arch(name)`: the architecture `name` (the part after `source:`) with random
  weights and the input convention of its weights; None where a spec is not an architecture;
- `load_pretrained(name, *, weights, cache_dir, arch)`: the backbone a recipe names, with
  its weights (`weights` a local file replacing the download, `cache_dir` the library cache,
  `arch` the architecture of a plain state dict);
- `describe`: (spec, what it is) rows for `stagewise backbones`;
- `with_head`: its backbones carry a published head (`Backbone.published_head`), which an
  arm can start from (`head.pretrained`).

A source whose published files have a layout of their own (another project's checkpoint
format) also registers that layout with `register_checkpoint_format`, so that `file:` reads
such a file without knowing the source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stagewise.models.base import Backbone, BackboneError


@dataclass(frozen=True)
class Source:
    name: str
    archs: Sequence[str]
    build_arch: Callable[[str], Backbone] | None
    load_pretrained: Callable[..., Backbone]
    describe: Sequence[tuple[str, str]]
    with_head: bool = False


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint layout `file:` recognises: `convert(obj, source)` turns what the file
    holds (as `safe_pickle.load_checkpoint` reads it) into a Backbone with its weights, or
    returns None when the file is not in this layout; `data_classes` are the classes such
    files pickle beside their tensors, read as inert data."""

    name: str
    convert: Callable[[object, str], Backbone | None]
    data_classes: Sequence[str] = ()


_SOURCES: dict[str, Source] = {}
_FORMATS: dict[str, CheckpointFormat] = {}


def register_source(
    name: str,
    *,
    archs: Sequence[str] = (),
    build_arch: Callable[[str], Backbone] | None,
    load_pretrained: Callable[..., Backbone],
    describe: Sequence[tuple[str, str]],
    with_head: bool = False,
) -> Source:
    """Add a source; each name once (a second registration is a programming error)."""
    if name in _SOURCES:
        raise ValueError(f"backbone source {name!r} is registered twice")
    if ":" in name or not name:
        raise ValueError(f"backbone source name {name!r} must be non-empty and hold no ':'")
    source = Source(name, tuple(archs), build_arch, load_pretrained, tuple(describe), with_head)
    _SOURCES[name] = source
    return source


def register_checkpoint_format(
    name: str, *, convert: Callable[[object, str], Backbone | None], data_classes: Sequence[str] = ()
) -> CheckpointFormat:
    """Add a checkpoint layout for `file:`; each name once."""
    if name in _FORMATS:
        raise ValueError(f"checkpoint format {name!r} is registered twice")
    fmt = CheckpointFormat(name, convert, tuple(data_classes))
    _FORMATS[name] = fmt
    return fmt


def checkpoint_formats() -> list[CheckpointFormat]:
    """The registered checkpoint layouts, in registration order."""
    return list(_FORMATS.values())


def list_sources() -> list[str]:
    """Source names in registration order."""
    return list(_SOURCES)


def get_source(name: str) -> Source:
    try:
        return _SOURCES[name]
    except KeyError:
        raise BackboneError(f"unknown source {name!r}; choose one of {list_sources()}") from None


def build_arch(arch: str) -> Backbone:
    """A backbone of architecture `arch` (e.g. 'torchvision:resnet50', 'xrv:resnet50-res512-all',
    'timm:resnet18', 'scratch:resnet18', 'monai:resnet18') with random weights and the same
    input convention as its pretrained weights."""
    source, _, name = arch.partition(":")
    found = _SOURCES.get(source)
    if found is None or found.build_arch is None:
        raise BackboneError(f"unknown architecture {arch!r}; sources with architectures: {_arch_sources()}")
    return found.build_arch(name)


def create_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    arch: str | None = None,
) -> Backbone:
    """Build the backbone a recipe names (e.g. 'xrv:resnet50-res512-all'), loading its weights
    through the source library (or from `weights`, a local file, where the source takes one)."""
    source, _, rest = name.partition(":")
    if source not in _SOURCES:
        raise BackboneError(f"backbone {name!r}: unknown source {source!r}; choose one of {list_sources()}")
    return _SOURCES[source].load_pretrained(
        rest,
        weights=Path(weights) if weights is not None else None,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        arch=arch,
    )


def describe_sources() -> list[tuple[str, str]]:
    """(spec, what it is) for every source, for `stagewise backbones`."""
    return [row for source in _SOURCES.values() for row in source.describe]


def list_archs() -> list[str]:
    """Every concrete architecture the registered sources declare, as 'source:name'."""
    return [f"{source.name}:{a}" for source in _SOURCES.values() for a in source.archs]


def _arch_sources() -> list[str]:
    return [s.name for s in _SOURCES.values() if s.build_arch is not None]
