"""NIfTI volumes (`.nii`, `.nii.gz`, e.g. brain MRI) as float32 (D, H, W) arrays in [0, 1].

They are read with nibabel into one canonical orientation, so that scanners storing the voxels
in different orders give the same array, and their intensities (which have no fixed range in
MRI) are scaled robustly to [0, 1]. `readers.read_image` and `readers.read_image_bytes` choose
this reader by extension or, for content in memory, by the NIfTI magic.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from stagewise.data.reader_base import ImageReadError, check_pixels, minmax

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Percentiles that bound a volume's intensities: a few hot voxels (vessels, artefacts)
# must not squeeze the brain into a narrow band of grey values.
_VOLUME_PERCENTILES = (0.5, 99.5)


def is_volume_path(path: str | Path) -> bool:
    """True for files read as 3D volumes (NIfTI: `.nii`, `.nii.gz`)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


# A gzipped NIfTI upload is decompressed in memory up to this size (a 256^3 float32 volume
# is 64 MiB): a small file that claims to unpack to many gigabytes is refused, not unpacked.
MAX_VOLUME_BYTES = 1 << 30


def nifti_content(data: bytes, name: str) -> np.ndarray | None:
    """The volume of in-memory NIfTI content (by extension or magic), or None if it is not NIfTI."""
    declared = is_volume_path(name)
    raw = data
    if data[:2] == b"\x1f\x8b":  # gzip: peek at the header before unpacking everything
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, 352)
        except zlib.error:
            head = b""
        if not declared and not _is_nifti_header(head):
            return None
        try:
            unpack = zlib.decompressobj(16 + zlib.MAX_WBITS)
            raw = unpack.decompress(data, MAX_VOLUME_BYTES)
        except zlib.error as err:
            raise ImageReadError(
                name, f"not a readable NIfTI file (gzip: {err}); it may be truncated or not NIfTI at all"
            ) from None
        if unpack.unconsumed_tail:
            raise ImageReadError(
                name, f"the gzipped NIfTI file unpacks to more than {MAX_VOLUME_BYTES >> 20} MiB; store it as a smaller volume"
            )
    elif not declared and not _is_nifti_header(data):
        return None
    import nibabel as nib

    kind = nib.Nifti2Image if raw[4:8] == b"n+2\x00" else nib.Nifti1Image
    try:
        img = kind.from_bytes(raw)
    except Exception as err:  # nibabel raises ImageFileError, HeaderDataError, ValueError, ...
        raise ImageReadError(
            name, f"not a readable NIfTI file ({type(err).__name__}: {err}); it may be truncated or not NIfTI at all"
        ) from None
    return _nifti_volume(img, Path(name))


def _is_nifti_header(head: bytes) -> bool:
    return head[344:348] == b"n+1\x00" or head[4:8] == b"n+2\x00"


def _robust_scale(arr: np.ndarray) -> np.ndarray:
    """Clip to the 0.5-99.5 percentiles, then min-max to [0, 1]; NaN/inf count as the minimum.

    A volume whose percentiles coincide (almost all background) falls back to plain
    min-max, so a small bright structure is not clipped away; a constant one gives zeros.
    """
    finite = np.isfinite(arr)
    if not finite.all():
        if not finite.any():
            return np.zeros(arr.shape, dtype=np.float32)
        arr = np.where(finite, arr, arr[finite].min())
    lo, hi = (float(v) for v in np.percentile(arr, _VOLUME_PERCENTILES))
    if hi <= lo:
        return minmax(arr)
    arr = np.clip(arr, lo, hi)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def read_nifti(path: Path) -> np.ndarray:
    """A NIfTI volume as float32 (D, H, W) in [0, 1].

    The voxels are first reoriented to the closest canonical (RAS+) orientation, so the
    axes mean the same thing whatever order the scanner stored them in: D runs inferior ->
    superior (axial slices), H anterior -> posterior (row 0 at the front, as an axial slice
    is usually displayed) and W from the patient's left to right. A 4D file (a time series
    or several echoes) gives its first volume. Intensities are scaled by `_robust_scale`.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError, ...
        raise ImageReadError(
            path, f"not a readable NIfTI file ({type(err).__name__}: {err}); it may be truncated or not NIfTI at all"
        ) from None
    return _nifti_volume(img, path)


def _nifti_volume(img, path: Path) -> np.ndarray:
    """The loaded NIfTI image `img` (read from `path`) as a canonical (D, H, W) array in [0, 1]."""
    import nibabel as nib

    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3 or (len(shape) > 3 and any(n == 0 for n in shape[3:])):
        raise ImageReadError(
            path,
            f"the NIfTI file holds data of shape {shape}, not a 3D volume; stagewise reads 3D volumes "
            "(of a 4D file, the first volume): store the scan as a 3D NIfTI",
        )
    check_pixels(path, shape[:3])  # the header's shape: no voxel read yet
    try:
        while img.ndim > 3:  # 4D (time, echoes) or 5D: the first volume, read lazily
            img = img.slicer[..., 0]
        img = nib.as_closest_canonical(img)
        arr = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as err:
        raise ImageReadError(
            path,
            f"the NIfTI voxel data cannot be read ({type(err).__name__}: {err}); the file may be truncated "
            "or its header damaged",
        ) from None
    if min(arr.shape) < 1:
        raise ImageReadError(path, f"the NIfTI volume is empty (shape {arr.shape})")
    # Canonical arrays are indexed (x: left -> right, y: posterior -> anterior, z: inferior -> superior).
    arr = np.ascontiguousarray(arr.transpose(2, 1, 0)[:, ::-1, :])
    return _robust_scale(arr)
