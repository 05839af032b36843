"""What every image reader shares: the error it raises, the pixel limit checked before any
decoding, and the min-max fallback scaling.

Kept apart from the readers themselves (`dicom_reader`, `nifti_reader`, `pil_reader`) so that
each can raise the same error without importing the others or the dispatcher (`readers`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from stagewise.errors import StagewiseError

MAX_PIXELS_ENV = "STAGEWISE_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 1 << 27
"""The most pixels (rows x columns x frames, or voxels) an image may hold: 134,217,728, a
512^3 volume or an 11585 px square, far above any radiograph or mammogram. A small file can
declare far more (a deflated DICOM of 20000 x 20000 pixels is under 1 MB) and would take
minutes and gigabytes to decode; the header is checked first. `STAGEWISE_MAX_IMAGE_PIXELS`
(or `--max-image-pixels` of `predict`, `serve` and `evaluate`) raises it."""


class ImageReadError(StagewiseError):
    """An image file that cannot be read; `reason` says what is wrong and what to do."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):
        # Default pickling would call ImageReadError(message): keep both fields.
        return (type(self), (self.path, self.reason))


def max_image_pixels() -> int:
    """The pixel limit: `STAGEWISE_MAX_IMAGE_PIXELS` when set, else `DEFAULT_MAX_PIXELS`."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise StagewiseError(f"{MAX_PIXELS_ENV}={raw!r}: give a positive whole number of pixels (default "
                             f"{DEFAULT_MAX_PIXELS})")
    return value


def check_pixels(path: str | Path, dims: tuple[int, ...]) -> None:
    """Refuse, before decoding, an image whose header declares more pixels than the limit."""
    limit = max_image_pixels()
    count = math.prod(int(d) for d in dims)
    if count > limit:
        raise ImageReadError(
            path, f"the image declares {' x '.join(str(int(d)) for d in dims)} = {count:,} pixels, more than the "
                  f"{limit:,} stagewise decodes (set {MAX_PIXELS_ENV}, or --max-image-pixels, to raise the limit for a "
                  "genuine image of that size)")


def minmax(arr: np.ndarray) -> np.ndarray:
    """The image's own minimum to 0 and maximum to 1: only for data without a storable range."""
    arr = arr.astype(np.float64, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:  # a constant image carries no contrast; zeros rather than 0/0 = NaN
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)
