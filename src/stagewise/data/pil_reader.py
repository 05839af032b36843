"""PNG, JPEG and the other formats Pillow reads, as float32 (H, W) grayscale in [0, 1].

Integer pixels are divided by the range their stored type holds (8-bit /255, 16-bit /65535 or
by the significant bits a PNG's sBIT chunk records), never by the image's own minimum and
maximum, so that the same stored values give the same array as from a DICOM file.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np

from stagewise.data.reader_base import ImageReadError, check_pixels, minmax
from stagewise.errors import StagewiseError

# Extensions Pillow reads: content that starts like a DICOM group is still given to Pillow.
PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}

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


def read_pil(path: Path, content: io.BytesIO | None = None) -> np.ndarray:
    """`path` names the file in errors; `content`, when given, is read instead of it."""
    from PIL import Image, ImageOps

    source = path if content is None else content
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning is replaced by the reader's pixel limit (check_pixels)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                is_png = im.format == "PNG"
                check_pixels(path, (im.height, im.width))  # the header only: nothing decoded yet
                im.load()  # decoding is lazy: truncation only shows here
                im = ImageOps.exif_transpose(im)
    except StagewiseError:  # the pixel limit's refusal, or its setting's error
        raise
    except Image.DecompressionBombError as err:  # over twice Pillow's own limit, refused by Pillow at open
        raise ImageReadError(path, f"the image declares more pixels than Pillow decodes ({err}); downsample it or "
                                   "export it as DICOM") from None
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
        return minmax(arr)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        return arr.copy() if arr.min() >= 0 and arr.max() <= 1 else minmax(arr)
    # Every other mode (1, L, LA, P, RGB, RGBA, CMYK, YCbCr, ...) is 8 bits per channel.
    return np.asarray(im.convert("L"), dtype=np.float32) / np.float32(255.0)

