"""Training-time input changes of a stage: CutMix/MixUp (MixConfig), the random crop, blur and
pixel masking (CropConfig, BlurConfig, MaskConfig) and the augmentation they belong to
(AugmentConfig)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from stagewise.recipe.base import PositiveFloat, StrictModel


class MixConfig(StrictModel):
    alpha: float = Field(1.0, gt=0)
    """The mixing weight is drawn from Beta(alpha, alpha)."""
    p: float = Field(0.5, ge=0, le=1)
    """Fraction of batches that are mixed."""


def _ordered_range(v: tuple[float, float], name: str) -> tuple[float, float]:
    if v[0] > v[1]:
        raise ValueError(f"{name} [{v[0]}, {v[1]}]: give [low, high] with low <= high")
    return v


class CropConfig(StrictModel):
    """torchvision's RandomResizedCrop on each image: a box of `scale` times the image area
    with aspect ratio in `ratio`, resized back to the image size. A box that does not fit
    (scale above 1 on a square image) falls back to torchvision's centre crop, as in the
    BPD code (scale 0.95-1.05, default ratio)."""

    scale: tuple[PositiveFloat, Annotated[float, Field(gt=0, le=2)]] = (0.95, 1.05)
    """Area range of the box, as fractions of the image area."""
    ratio: tuple[PositiveFloat, PositiveFloat] = (3 / 4, 4 / 3)
    """Aspect ratio (width / height) range of the box."""
    p: float = Field(1.0, ge=0, le=1)
    """Share of images cropped (torchvision's transform crops every image: 1)."""

    @field_validator("scale", "ratio")
    @classmethod
    def _low_high(cls, v, info):
        return _ordered_range(v, info.field_name)


class BlurConfig(StrictModel):
    """torchvision's GaussianBlur on a share `p` of the images, sigma drawn per image."""

    kernel: int = Field(9, ge=3)
    """Kernel size in pixels (odd)."""
    sigma: tuple[PositiveFloat, PositiveFloat] = (0.05, 2.0)
    """Range of the blur's standard deviation in pixels."""
    p: float = Field(0.5, ge=0, le=1)
    """Share of images blurred."""

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"kernel {v}: a Gaussian kernel size is odd (e.g. 9)")
        return v

    @field_validator("sigma")
    @classmethod
    def _low_high(cls, v):
        return _ordered_range(v, "sigma")


class MaskConfig(StrictModel):
    """Random pixel masking (the BPD code's RandomMasking): in a share `p` of the images,
    each pixel is set to `value` with probability `fraction`."""

    fraction: float = Field(0.25, gt=0, lt=1)
    """Probability that a pixel of a masked image is set to `value`."""
    p: float = Field(0.1, ge=0, le=1)
    """Share of images masked."""
    value: float = Field(0.0, ge=0, le=1)
    """Fill on the [0, 1] image scale. The BPD code zeroes pixels after normalising, which is
    0.5 here for torchxrayvision inputs ([-1024, 1024]) and about the ImageNet mean for RGB."""


class AugmentConfig(StrictModel):
    flip: bool = False
    """Mirror each image left to right with probability 0.5 (a volume: each axis on its own)."""
    rotate: float = Field(0.0, ge=0, le=180)
    """Maximum rotation in degrees."""
    translate: float = Field(0.0, ge=0, le=0.5)
    """Maximum shift as a fraction of the image side."""
    scale: float = Field(0.0, ge=0, le=0.5)
    """Maximum zoom in or out, as a fraction."""
    intensity: float = Field(0.0, ge=0, le=1)
    """Maximum brightness and contrast change, as a fraction."""
    crop: CropConfig | None = None
    """Random resized crop (2D), after flip and rotation."""
    blur: BlurConfig | None = None
    """Gaussian blur (2D), after the crop."""
    mask: MaskConfig | None = None
    """Random pixel masking, last."""

    @property
    def active(self) -> bool:
        return bool(self.flip or self.rotate or self.translate or self.scale or self.intensity) or any(
            c is not None for c in (self.crop, self.blur, self.mask))
