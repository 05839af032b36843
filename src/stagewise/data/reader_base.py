"""What every image reader shares: the error it raises and the min-max fallback scaling.

Kept apart from the readers themselves (`dicom_reader`, `nifti_reader`, `pil_reader`) so that
each can raise the same error without importing the others or the dispatcher (`readers`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from stagewise.errors import StagewiseError


class ImageReadError(StagewiseError):
    """An image file that cannot be read; `reason` says what is wrong and what to do."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):
        # Default pickling would call ImageReadError(message): keep both fields.
        return (type(self), (self.path, self.reason))


def minmax(arr: np.ndarray) -> np.ndarray:
    """The image's own minimum to 0 and maximum to 1: only for data without a storable range."""
    arr = arr.astype(np.float64, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:  # a constant image carries no contrast; zeros rather than 0/0 = NaN
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)
