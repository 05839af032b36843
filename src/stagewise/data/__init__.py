"""The data layer: check a cohort manifest, then read its images into one tensor."""

from stagewise.data.image_checks import check_images
from stagewise.data.cohort import Cohort, CohortError, load_cohort
from stagewise.data.readers import ImageReadError, read_image


def __getattr__(name: str):
    """`load_images` and `to_square` import torch: only when asked for, so that checking a
    manifest (a hospital's `federation site`, the coordinator) does not start torch."""
    if name in ("load_images", "to_square"):
        from stagewise.data import preprocess

        return getattr(preprocess, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Cohort",
    "CohortError",
    "ImageReadError",
    "check_images",
    "load_cohort",
    "load_images",
    "read_image",
    "to_square",
]
