"""Backbones (pretrained trunks with named, ordered layer groups) and heads.

Importing this package registers every backbone source: one module per source, each
registering itself with `registry` when imported; `stagewise backbones` lists them in
registration order (a module's own imports come first: `scratch` imports `tiny`).
"""

from stagewise.models import (  # noqa: F401  (imported to register their sources)
    xrv,
    torchvision_source,
    timm_source,
    monai_source,
    tiny,
    scratch,
    bpd,
    files,
)
from stagewise.models.base import Backbone, BackboneError, InputSpec, WeightsUnavailable, save_backbone
from stagewise.models.files import load_network, save_network
from stagewise.models.heads import Head, Network
from stagewise.models.registry import (
    build_arch,
    create_backbone,
    describe_sources,
    list_archs,
    list_sources,
    register_source,
)

__all__ = [
    "Backbone",
    "BackboneError",
    "Head",
    "InputSpec",
    "Network",
    "WeightsUnavailable",
    "build_arch",
    "create_backbone",
    "describe_sources",
    "list_archs",
    "list_sources",
    "load_network",
    "register_source",
    "save_backbone",
    "save_network",
]
