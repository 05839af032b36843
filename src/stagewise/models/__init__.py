from stagewise.models.backbones import (
    Backbone,
    BackboneError,
    InputSpec,
    WeightsUnavailable,
    build_arch,
    create_backbone,
    save_backbone,
)
from stagewise.models.heads import Head, Network

__all__ = [
    "Backbone",
    "BackboneError",
    "Head",
    "InputSpec",
    "Network",
    "WeightsUnavailable",
    "build_arch",
    "create_backbone",
    "save_backbone",
]
