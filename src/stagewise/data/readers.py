"""Read one image file of any common format as a grayscale float array in [0, 1].

Clinical cohorts mix 8-bit PNG exports, 16-bit PNGs, JPEGs and raw DICOM; every reader
must agree on what "brighter" and "[0, 1]" mean, or one site's images would differ from
another's for reasons that have nothing to do with the patient. The convention
(`INTENSITY_CONVENTION`, recorded in every bundle) is the storable range: integer pixels are
divided by the range their stored type can hold, never by the image's own minimum and
maximum, so the same stored values give the same array whether they come as PNG or DICOM,
and a dark image stays dark. 8-bit data is divided by 255; 16-bit data by 65535, or by
2**n - 1 where a PNG's sBIT chunk says n bits are significant (`pil_reader`); DICOM by the
range of BitsStored (signed or not) carried through its Modality LUT or rescale, or, where
the file has a VOI LUT or window and it is applied, by that transform's output range;
MONOCHROME1 is inverted within that range. Float data keeps its values when they lie in
[0, 1] (float TIFF) and NIfTI volumes are scaled robustly (below). Min-max scaling remains
only where no storable range is known: float images outside [0, 1], 32-bit integer images
beyond the 16-bit range, and DICOM float pixel data.

NIfTI files (`.nii`, `.nii.gz`) are 3D volumes, e.g. brain MRI: they are read with nibabel
into one canonical orientation, so that scanners storing the voxels in different orders
give the same array, and their intensities (which have no fixed range in MRI) are scaled
robustly to [0, 1].

Each format has its own module (`dicom_reader`, `nifti_reader`, `pil_reader` for PNG, JPEG and
the rest of Pillow's formats); this one chooses among them by extension or content, so that
every caller reads images through the same two doors (`read_image`, `read_image_bytes`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from stagewise.data.dicom_reader import DICOM_SUFFIXES, read_dicom
from stagewise.data.nifti_reader import MAX_VOLUME_BYTES, is_volume_path, nifti_content, read_nifti
from stagewise.data.pil_reader import PIL_SUFFIXES, png_significant_bits, read_pil
from stagewise.data.reader_base import ImageReadError

__all__ = [
    "INTENSITY_CONVENTION",
    "INTENSITY_DESCRIPTION",
    "MAX_VOLUME_BYTES",
    "NOT_A_FILE",
    "ImageReadError",
    "is_volume_path",
    "png_significant_bits",
    "read_image",
    "read_image_bytes",
]

INTENSITY_CONVENTION = "storable-range-v1"
"""The name and version of how pixels become [0, 1] (see the module docstring); a bundle
records it, so that one made under another convention can say so when it is used."""
INTENSITY_DESCRIPTION = (
    "integer pixels divided by the range their stored type can hold (8-bit /255, 16-bit by its significant bits, "
    "DICOM by BitsStored after the Modality LUT or rescale, or by the output range of its VOI LUT or window when "
    "one is applied; MONOCHROME1 inverted within that range); float data kept in [0, 1], NIfTI volumes clipped "
    "to their 0.5-99.5 percentiles; min-max only where no storable range is known"
)


NOT_A_FILE = ("no such file", "is a folder, not a file")
"""The reason of a path that names no file (indexed by whether it is a folder): where the
path came from (a manifest, a command line) says what to check, so the reader does not."""


def read_image(path: str | Path) -> np.ndarray:
    """Return the image as float32 in [0, 1], higher = brighter, whatever the format.

    2D images (PNG, JPEG, DICOM, ...) give (H, W); NIfTI volumes give (D, H, W), see
    `nifti_reader.read_nifti` for the axes. The extension decides which, so one manifest column serves both.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, NOT_A_FILE[path.is_dir()])
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError as err:
        reason = f"the file cannot be opened ({err.strerror}); check its permissions"
        raise ImageReadError(path, reason) from None
    if not head:
        raise ImageReadError(
            path, "the file is empty (0 bytes), e.g. an interrupted copy or download; copy it again or remove its row"
        )
    if is_volume_path(path):
        return read_nifti(path)
    if path.suffix.lower() in DICOM_SUFFIXES or head[128:132] == b"DICM":
        return read_dicom(path)
    return read_pil(path)


def read_image_bytes(data: bytes | bytearray | memoryview, name: str = "upload") -> np.ndarray:
    """`read_image` for a file's content held in memory: nothing is written to disk.

    The same readers, scaling and errors as `read_image` (a file's bytes give the same
    array either way). `name` stands for the path: its extension chooses the reader as a
    path's does, and errors name it. Where the extension says nothing, the content decides:
    DICOM by its "DICM" marker or, without the 128-byte preamble, by a first element of
    group 0002 or 0008; NIfTI-1/2 (optionally gzipped) by its magic; anything else goes to
    Pillow. `name` never reaches the disk or a log from here.
    """
    data = bytes(data)
    if not data:
        raise ImageReadError(
            name, "the file is empty (0 bytes), e.g. an interrupted copy or download; copy it again or remove its row"
        )
    volume = nifti_content(data, name)
    if volume is not None:
        return volume
    suffix = Path(name).suffix.lower()
    if suffix in DICOM_SUFFIXES or data[128:132] == b"DICM" or (
        suffix not in PIL_SUFFIXES and data[:2] in (b"\x02\x00", b"\x08\x00")
    ):
        return read_dicom(Path(name), io.BytesIO(data))
    return read_pil(Path(name), io.BytesIO(data))
