"""DICOM files as float32 (H, W) grayscale in [0, 1], through the file's own LUTs and window.

Scaled by the storable range after those transforms (BitsStored, signed or not, through the
Modality LUT or rescale, or the VOI LUT's or window's output range), so that a dark image stays
dark and the same stored values give the same array as from a PNG; MONOCHROME1 is inverted.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from stagewise.data.reader_base import ImageReadError, check_pixels, minmax

DICOM_SUFFIXES = {".dcm", ".dicom"}
# ITU-R BT.601 luma, the weights PIL's convert("L") uses, so RGB PNG and RGB DICOM agree.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def read_dicom(path: Path, content: io.BytesIO | None = None) -> np.ndarray:
    """`path` names the file in errors; `content`, when given, is read instead of it.

    Scaled by `_dicom_range`, the storable range after the file's own transforms; float
    pixel data, which has no such range, by min-max."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    _check_header(path, content)
    try:
        # force: DICOM files written without the 128-byte preamble are still common.
        ds = pydicom.dcmread(path if content is None else content, force=True)
    except Exception as err:
        raise ImageReadError(
            path, f"not a readable DICOM file ({type(err).__name__}: {err}); it may be truncated"
        ) from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(
            path,
            "the DICOM file holds no pixel data (a report or other non-image object, or not "
            "DICOM at all); point the manifest at the image file or remove its row",
        )
    try:
        arr = ds.pixel_array
    except Exception as err:
        raise ImageReadError(
            path,
            f"the DICOM pixel data cannot be decoded ({type(err).__name__}: {err}); a compressed "
            "transfer syntax may need a decoder plugin, or the file may be truncated",
        ) from None

    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    try:
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        if arr.ndim == 3:
            # the palette's entries are 8 or 16 bits (its descriptor), whatever the indices hold
            span = (0.0, float(np.iinfo(arr.dtype).max)) if photometric == "PALETTE COLOR" else _stored_range(ds)
            # pixel_array already converts YBR to RGB; modality/VOI LUTs are grayscale only.
            arr = arr[..., :3] @ _LUMA
        else:
            span = _dicom_range(ds)
            with warnings.catch_warnings():
                # pydicom warns whenever a VOI LUT is indexed by rescaled floats; with the usual
                # integer slope and intercept that is exact, and one warning per image floods logs.
                warnings.simplefilter("ignore")
                arr = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    except Exception as err:
        raise ImageReadError(
            path,
            f"the DICOM lookup tables or window settings cannot be applied ({type(err).__name__}: "
            f"{err}); fix or remove the file's LUT/WindowCenter/WindowWidth elements",
        ) from None
    lo, hi = span
    if "PixelData" not in ds or hi <= lo:  # float pixel data (no storable range), or a rescale slope of 0
        img = minmax(arr)
    else:
        img = np.clip((np.asarray(arr, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        img = np.float32(1.0) - img  # MONOCHROME1 stores low = bright
    return img


def _check_header(path: Path, content: io.BytesIO | None) -> None:
    """Before any pixel is decoded: one frame only (a series, volume or cine loop is not one
    2D image, and no frame of it is chosen silently), and no more pixels than the limit."""
    import pydicom

    try:
        ds = pydicom.dcmread(path if content is None else content, force=True, stop_before_pixels=True)
    except Exception:  # the full read below says what is wrong
        return
    finally:
        if content is not None:
            content.seek(0)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        dims = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    except (TypeError, ValueError):
        return
    if frames > 1:
        raise ImageReadError(path, f"the DICOM file has {frames} frames (a series, volume or cine loop); stagewise scores "
                                   "single-frame 2D images: export the image to use as a file of its own")
    check_pixels(path, dims)


def _stored_range(ds) -> tuple[float, float]:
    """What BitsStored bits can hold: 0 .. 2**n - 1, or -2**(n-1) .. 2**(n-1) - 1 when signed."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _lut_range(item) -> tuple[float, float]:
    """A LUT's output range, from the bits per entry of its descriptor (third value)."""
    return 0.0, 2.0 ** int(item.LUTDescriptor[2]) - 1


def _dicom_range(ds) -> tuple[float, float]:
    """The range a grayscale DICOM's values can take after `apply_voi_lut(apply_modality_lut())`.

    Mirrors pydicom's choices (pydicom.pixels.processing): a VOI LUT Sequence with descriptor
    and data is preferred to a window, and gives its entries' range; a window gives the
    modality output range (pydicom's y_min .. y_max); without either, the modality output
    range itself: the Modality LUT's entries, or the stored range through the rescale (sorted,
    so that a negative slope keeps the order)."""
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        return _lut_range(voi[0])
    windowed = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    modality = ds.get("ModalityLUTSequence")
    lo, hi = _lut_range(modality[0]) if modality else _stored_range(ds)
    if (windowed or not modality) and ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi
