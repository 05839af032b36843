"""Read one image file of any common format as a grayscale float array in [0, 1].

Clinical cohorts mix 8-bit PNG exports, 16-bit PNGs, JPEGs and raw DICOM; every reader
must agree on what "brighter" and "[0, 1]" mean, or one site's images would differ from
another's for reasons that have nothing to do with the patient. The convention
(`INTENSITY_CONVENTION`, recorded in every bundle) is the storable range: integer pixels are
divided by the range their stored type can hold, never by the image's own minimum and
maximum, so the same stored values give the same array whether they come as PNG or DICOM,
and a dark image stays dark. 8-bit data is divided by 255; 16-bit data by 65535, or by
2**n - 1 where a PNG's sBIT chunk says n bits are significant (`_scale_16bit`); DICOM by the
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
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np

_DICOM_SUFFIXES = {".dcm", ".dicom"}
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Percentiles that bound a volume's intensities: a few hot voxels (vessels, artefacts)
# must not squeeze the brain into a narrow band of grey values.
_VOLUME_PERCENTILES = (0.5, 99.5)
# ITU-R BT.601 luma, the weights PIL's convert("L") uses, so RGB PNG and RGB DICOM agree.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

INTENSITY_CONVENTION = "storable-range-v1"
"""The name and version of how pixels become [0, 1] (see the module docstring); a bundle
records it, so that one made under another convention can say so when it is used."""
INTENSITY_DESCRIPTION = (
    "integer pixels divided by the range their stored type can hold (8-bit /255, 16-bit by its significant bits, "
    "DICOM by BitsStored after the Modality LUT or rescale, or by the output range of its VOI LUT or window when "
    "one is applied; MONOCHROME1 inverted within that range); float data kept in [0, 1], NIfTI volumes clipped "
    "to their 0.5-99.5 percentiles; min-max only where no storable range is known"
)


class ImageReadError(Exception):
    """An image file that cannot be read; `reason` says what is wrong and what to do."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):
        # Default pickling would call ImageReadError(message): keep both fields.
        return (type(self), (self.path, self.reason))


def is_volume_path(path: str | Path) -> bool:
    """True for files read as 3D volumes (NIfTI: `.nii`, `.nii.gz`)."""
    return Path(path).name.lower().endswith(_NIFTI_SUFFIXES)


def read_image(path: str | Path) -> np.ndarray:
    """Return the image as float32 in [0, 1], higher = brighter, whatever the format.

    2D images (PNG, JPEG, DICOM, ...) give (H, W); NIfTI volumes give (D, H, W), see
    `_read_nifti` for the axes. The extension decides which, so one manifest column serves both.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "no such file"
        raise ImageReadError(path, f"{what}; check the image path in the manifest")
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
        return _read_nifti(path)
    if path.suffix.lower() in _DICOM_SUFFIXES or head[128:132] == b"DICM":
        return _read_dicom(path)
    return _read_pil(path)


# A gzipped NIfTI upload is decompressed in memory up to this size (a 256^3 float32 volume
# is 64 MiB): a small file that claims to unpack to many gigabytes is refused, not unpacked.
MAX_VOLUME_BYTES = 1 << 30


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
    volume = _nifti_content(data, name)
    if volume is not None:
        return volume
    suffix = Path(name).suffix.lower()
    if suffix in _DICOM_SUFFIXES or data[128:132] == b"DICM" or (
        suffix not in _PIL_SUFFIXES and data[:2] in (b"\x02\x00", b"\x08\x00")
    ):
        return _read_dicom(Path(name), io.BytesIO(data))
    return _read_pil(Path(name), io.BytesIO(data))


# Extensions Pillow reads: content that starts like a DICOM group is still given to Pillow.
_PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def _nifti_content(data: bytes, name: str) -> np.ndarray | None:
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


def _minmax(arr: np.ndarray) -> np.ndarray:
    """The image's own minimum to 0 and maximum to 1: only for data without a storable range."""
    arr = arr.astype(np.float64, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:  # a constant image carries no contrast; zeros rather than 0/0 = NaN
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


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
        return _minmax(arr)
    arr = np.clip(arr, lo, hi)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _read_nifti(path: Path) -> np.ndarray:
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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_significant_bits(path: str | Path) -> int | None:
    """The significant bits (sBIT chunk) of a 16-bit grayscale PNG, or None.

    None when the file is not such a PNG, has no (valid) sBIT chunk, or the chunk says all
    16 bits are significant. Pillow does not expose sBIT, so the chunks before the image
    data are walked here (PNG spec 11.3.3.4: for grayscale, one byte, 1..bit depth).
    """
    try:
        if hasattr(path, "read"):  # content in memory (read_image_bytes): a seekable binary file object
            path.seek(0)
            return _png_sbit(path)
        with open(path, "rb") as f:
            return _png_sbit(f)
    except OSError:
        return None


def _png_sbit(f) -> int | None:
    if f.read(8) != _PNG_SIGNATURE:
        return None
    depth = color = None
    while True:
        head = f.read(8)
        if len(head) < 8:
            return None
        length, kind = struct.unpack(">I4s", head)
        if kind in (b"IDAT", b"IEND"):  # sBIT must come before the image data
            return None
        if kind not in (b"IHDR", b"sBIT"):
            f.seek(length + 4, 1)  # skip data and CRC
            continue
        data = f.read(length)
        f.seek(4, 1)
        if len(data) < length or length < 1:
            return None
        if kind == b"IHDR":
            if length < 10:
                return None
            depth, color = data[8], data[9]
            if depth != 16 or color != 0:  # only 16-bit grayscale is handled
                return None
            continue
        bits = data[0]
        return bits if depth == 16 and 1 <= bits < 16 else None


def _scale_16bit(arr: np.ndarray, path, is_png: bool) -> np.ndarray:
    """uint16-range data to [0, 1] by bit depth (65535), unless a PNG's sBIT says fewer
    bits are significant AND the values were stored unshifted.

    The PNG spec has an encoder scale n-bit data up to 16 bits (left shift, maybe with bit
    replication) and record n in sBIT; such files are right as /65535. Many writers store
    the raw 12-bit values instead (max 4095, i.e. nearly black as /65535): those are seen
    by values that fit in n bits yet use the low 16-n bits, and are scaled by 2**n - 1.
    """
    bits = png_significant_bits(path) if is_png else None
    if bits is not None:
        top = (1 << bits) - 1
        if int(arr.max()) <= top and np.any(arr.astype(np.uint32) & ((1 << (16 - bits)) - 1)):
            return (arr.astype(np.float32) / np.float32(top)).astype(np.float32)
    return arr.astype(np.float32) / np.float32(65535.0)


def _read_pil(path: Path, content: io.BytesIO | None = None) -> np.ndarray:
    """`path` names the file in errors; `content`, when given, is read instead of it."""
    from PIL import Image, ImageOps

    source = path if content is None else content
    try:
        with Image.open(source) as im:
            is_png = im.format == "PNG"
            im.load()  # decoding is lazy: truncation only shows here
            im = ImageOps.exif_transpose(im)
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageReadError(
            path,
            f"not a readable image ({type(err).__name__}: {err}); the file may be truncated or "
            "in an unsupported format: re-export it as PNG or DICOM, or remove its row",
        ) from None
    if im.mode.startswith("I;16"):
        return _scale_16bit(np.asarray(im), source, is_png)
    if im.mode == "I":
        # 32-bit integer mode: PIL's container for 16-bit data in some formats; only data
        # beyond the 16-bit range has no known bit depth and falls back to min-max.
        arr = np.asarray(im)
        if arr.min() >= 0 and arr.max() <= 65535:
            if is_png and png_significant_bits(source) is not None:  # older Pillow opens 16-bit PNG as "I"
                return _scale_16bit(arr, source, is_png)
            return (arr / 65535.0).astype(np.float32)
        return _minmax(arr)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        return arr.copy() if arr.min() >= 0 and arr.max() <= 1 else _minmax(arr)
    # Every other mode (1, L, LA, P, RGB, RGBA, CMYK, YCbCr, ...) is 8 bits per channel.
    return np.asarray(im.convert("L"), dtype=np.float32) / np.float32(255.0)


def _read_dicom(path: Path, content: io.BytesIO | None = None) -> np.ndarray:
    """`path` names the file in errors; `content`, when given, is read instead of it.

    Scaled by `_dicom_range`, the storable range after the file's own transforms; float
    pixel data, which has no such range, by min-max."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

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

    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
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
        img = _minmax(arr)
    else:
        img = np.clip((np.asarray(arr, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        img = np.float32(1.0) - img  # MONOCHROME1 stores low = bright
    return img


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
