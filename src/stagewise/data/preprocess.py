"""Turn image files into one fixed-size tensor, reporting every unreadable file at once.

A cohort is small enough to hold in memory as float16, so images are decoded and resized
once per run rather than once per epoch. 2D images become (N, 1, S, S); 3D volumes (NIfTI)
become (N, 1, S, S, S), resized to a cube with the same pad / crop / stretch choices.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stagewise.data.cohort import CohortError
from stagewise.data.readers import ImageReadError, read_image

RESIZE_MODES = ("pad", "crop", "stretch")
_PROGRESS_OVER = 200


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    # PIL's resampling widens its kernel when shrinking (antialiased), and reducing_gap
    # box-reduces large images first, which keeps a 3000-pixel radiograph at a few ms.
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32))
    out = im.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def to_square(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Make a (size, size) image; `mode` decides whether anatomy is padded, cut or distorted."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")
    h, w = img.shape
    if mode == "stretch":
        return _resize(img, size, size)
    if mode == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return _resize(img[top : top + side, left : left + side], size, size)
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = _resize(img, nh, nw)
    return out


def _resize_volume(vol: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear resize of a (D, H, W) volume; a large reduction is box-averaged first.

    Trilinear interpolation samples only the 8 nearest voxels, so shrinking a 256^3 MRI to
    64^3 directly would alias; as PIL's reducing_gap does in 2D, each axis is first
    averaged over whole blocks while it stays at least twice the target size.
    """
    x = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None, None]
    factors = tuple(max(1, int(n // (2 * t))) for n, t in zip(vol.shape, shape))
    if max(factors) > 1:
        x = F.avg_pool3d(x, kernel_size=factors, stride=factors, ceil_mode=True)
    if tuple(x.shape[2:]) != tuple(shape):
        x = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return x[0, 0].clamp_(0.0, 1.0).numpy()


def to_cube(vol: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Make a (size, size, size) volume; `mode` as in `to_square`, over all three axes."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")
    d, h, w = vol.shape
    if mode == "stretch":
        return _resize_volume(vol, (size, size, size))
    if mode == "crop":
        side = min(d, h, w)
        z, top, left = (d - side) // 2, (h - side) // 2, (w - side) // 2
        return _resize_volume(vol[z : z + side, top : top + side, left : left + side], (size, size, size))
    scale = size / max(d, h, w)
    nd, nh, nw = (min(size, max(1, round(n * scale))) for n in (d, h, w))
    out = np.zeros((size, size, size), dtype=np.float32)
    z, top, left = (size - nd) // 2, (size - nh) // 2, (size - nw) // 2
    out[z : z + nd, top : top + nh, left : left + nw] = _resize_volume(vol, (nd, nh, nw))
    return out


def load_images(
    paths: Sequence[str | Path],
    size: int,
    resize: str = "pad",
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """Read all images into float16 (N, 1, size, size); one CohortError lists every bad file.

    NIfTI volumes give (N, 1, size, size, size) instead; a cohort holds either 2D images or
    3D volumes, and a file of the other kind is reported with its row.
    `rows` are the manifest row numbers used in messages, so a user can find the line to fix.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize mode {resize!r} is not one of {', '.join(RESIZE_MODES)}")
    rows = list(range(len(paths))) if rows is None else list(rows)
    if len(rows) != len(paths):
        raise ValueError(f"got {len(paths)} paths but {len(rows)} row numbers")

    def one(path: str | Path) -> np.ndarray | ImageReadError:
        try:
            img = read_image(path)
            return to_square(img, size, resize) if img.ndim == 2 else to_cube(img, size, resize)
        except ImageReadError as err:
            return err

    # Allocated at the first readable file, whose kind (2D image or 3D volume) the rest must share.
    out: torch.Tensor | None = None
    first = ""
    problems: list[str] = []
    # Threads overlap file I/O and PIL/zlib decoding, which release the GIL.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(one, paths)
        if len(paths) > _PROGRESS_OVER:
            from rich.console import Console
            from rich.progress import track

            results = track(
                results,
                total=len(paths),
                description="Reading images",
                transient=True,
                console=Console(stderr=True),
            )
        for i, (row, path, result) in enumerate(zip(rows, paths, results)):
            if isinstance(result, ImageReadError):
                problems.append(f"row {row}: {result.path}: {result.reason}")
                continue
            if out is None:
                out = torch.empty((len(paths), 1, *result.shape), dtype=torch.float16)
                first = f"row {row} ({path}) is {_KIND[result.ndim]}"
            elif result.ndim != out.dim() - 2:
                problems.append(
                    f"row {row}: {path}: {_KIND[result.ndim]}, but {first}; a cohort holds either 2D images "
                    "or 3D volumes (NIfTI), not both"
                )
                continue
            out[i, 0] = torch.from_numpy(result)
    if problems:
        raise CohortError(
            problems, hint="Fix or replace these image files, or remove their rows from the manifest."
        )
    if out is None:  # no paths at all
        out = torch.empty((0, 1, size, size), dtype=torch.float16)
    return out


_KIND = {2: "a 2D image", 3: "a 3D volume"}
