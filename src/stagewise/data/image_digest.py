"""What identifies an image's content without naming it: a digest of its decoded pixels and a
64-bit perceptual hash.

The cohort check (`image_checks`) finds one image filed twice by `content_digest`. A bundle
records, for every image it was trained on, the digest under a salt of its own and the
perceptual hash (`bundle.training_set`), so that an evaluation on another manifest finds the
same images there even when renamed or re-encoded (the digest is of the pixels as
`read_image` decodes them, before any resizing: a PNG saved again as TIFF with the same
pixels gives the same digest), and nearly the same images (a re-saved JPEG, a small edit)
by the perceptual hash. A salted digest says nothing about a file to whoever lacks the salt,
and two bundles' digests of one image differ. The perceptual hash is not salted (its bits
must stay comparable): it can point at an image one already holds, never at a patient.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from stagewise.data.readers import read_image

PERCEPTUAL = "dhash-64"
"""The perceptual hash: a difference hash of a 9 x 8 grayscale thumbnail (64 bits)."""
NEAR_DUPLICATE_BITS = 4
"""Two images whose perceptual hashes differ in at most this many of 64 bits count as
near-duplicates (the same picture re-encoded, slightly cropped or edited)."""


def content_digest(img: np.ndarray) -> bytes:
    """BLAKE2b (16 bytes) of a decoded image's shape and float32 pixels (C order): equal for
    equal decoded content, whatever the file's name or format."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(tuple(img.shape)).encode())
    h.update(np.ascontiguousarray(img, dtype=np.float32).tobytes())  # hashlib releases the GIL on large buffers
    return h.digest()


def salted_digest(salt: str, kind: str, payload: bytes) -> str:
    """SHA-256 of the salt (hex), the kind of value and the payload, as 64 hex digits."""
    return hashlib.sha256(bytes.fromhex(salt) + kind.encode() + b"\0" + payload).hexdigest()


def dhash(img: np.ndarray) -> str:
    """64-bit difference hash as 16 hex digits: the image (a volume: its mean over the first
    axis) shrunk to 9 x 8 by box averaging, one bit per horizontally adjacent pair (set where
    the left is darker), row by row. It survives resizing, re-encoding and small edits; an
    inverted image flips every bit that is not a tie."""
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.mean(axis=0)
    thumb = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((9, 8), Image.Resampling.BOX))
    return np.packbits((thumb[:, 1:] > thumb[:, :-1]).ravel()).tobytes().hex()


def hamming(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """(len(a), len(b)): how many bits differ between perceptual hashes (hex)."""
    left = np.array([int(h, 16) for h in a], dtype=np.uint64).reshape(-1, 1)
    right = np.array([int(h, 16) for h in b], dtype=np.uint64).reshape(1, -1)
    return np.bitwise_count(left ^ right).astype(int)


def image_fingerprints(paths: Sequence[str | Path], workers: int | None = None) -> list[tuple[bytes, str]]:
    """(content_digest, dhash) of each image file, decoded by `read_image` (`workers`
    threads, default min(8, CPUs)), in input order; an unreadable file raises ImageReadError."""
    def one(path):
        img = read_image(path)
        return content_digest(img), dhash(img)

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, paths))
