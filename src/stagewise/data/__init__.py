"""The data layer: check a cohort manifest, then read its images into one tensor."""

from stagewise.data.image_checks import check_images
from stagewise.data.cohort import Cohort, CohortError, load_cohort
from stagewise.data.preprocess import load_images, to_square
from stagewise.data.readers import ImageReadError, read_image

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
