"""Turn image files into one fixed-size tensor, reporting every unreadable file at once.

A cohort is small enough to hold in memory as float16, so images are decoded and resized
once per run rather than once per epoch.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
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


def load_images(
    paths: Sequence[str | Path],
    size: int,
    resize: str = "pad",
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """Read all images into float16 (N, 1, size, size); one CohortError lists every bad file.

    `rows` are the manifest row numbers used in messages, so a user can find the line to fix.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize mode {resize!r} is not one of {', '.join(RESIZE_MODES)}")
    rows = list(range(len(paths))) if rows is None else list(rows)
    if len(rows) != len(paths):
        raise ValueError(f"got {len(paths)} paths but {len(rows)} row numbers")

    def one(path: str | Path) -> np.ndarray | ImageReadError:
        try:
            return to_square(read_image(path), size, resize)
        except ImageReadError as err:
            return err

    out = torch.empty((len(paths), 1, size, size), dtype=torch.float16)
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
        for i, (row, result) in enumerate(zip(rows, results)):
            if isinstance(result, ImageReadError):
                problems.append(f"row {row}: {result.path}: {result.reason}")
            else:
                out[i, 0] = torch.from_numpy(result)
    if problems:
        raise CohortError(
            problems, hint="Fix or replace these image files, or remove their rows from the manifest."
        )
    return out
