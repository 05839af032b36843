"""The network an arm trains: its backbone spec (BackboneConfig) and its head (HeadConfig)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from stagewise.recipe.base import StrictModel


class BackboneConfig(StrictModel):
    """A backbone spec such as `xrv:resnet50-res512-all`, `torchvision:resnet50`,
    `timm:resnet18`, `scratch:resnet18` or `file:weights.safetensors`."""

    name: str
    """`source:name`; `stagewise backbones` lists the sources and their names."""
    weights: Path | None = None
    """A local weights file that replaces the library download (same format as the library's)."""
    cache_dir: Path | None = None
    """Where the library's own weight cache lives, if not its default."""
    arch: str | None = None
    """For `file:` weights saved as a plain state dict: the architecture, e.g. `torchvision:resnet50`."""

    @field_validator("name")
    @classmethod
    def _has_source(cls, v: str) -> str:
        if ":" not in v:
            raise ValueError(
                f"backbone {v!r} has no source prefix; write e.g. 'torchvision:{v}' "
                "(sources: xrv, torchvision, timm, monai, scratch, bpd, file, run, dual)"
            )
        return v


class HeadConfig(StrictModel):
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout before each of the head's linear layers."""
    hidden: int | None = None
    """Width of a hidden layer (small MLP head); None gives a linear head."""
    fusion: bool = False
    """Join image features with the cohort's clinical columns (imputed and standardised
    inside each training fold) before the head."""
    pretrained: bool = False
    """Start from the head published with the backbone's weights (`bpd:` models and their
    checkpoint files) instead of a new one: a linear head for the one outcome."""

    @model_validator(mode="after")
    def _pretrained_is_linear(self) -> "HeadConfig":
        if self.pretrained and (self.hidden or self.fusion):
            raise ValueError("head.pretrained loads a published linear head: it takes no `hidden` layer and no `fusion`")
        return self
