"""The content digest of a cohort: rows, labels, patients, sites, clinical and baseline
values, and the bytes of every image file. Part of every fold's fingerprint in a study and of
a federated job's image cache key, so that edited data is never mixed with old results."""

from __future__ import annotations

import hashlib

import pandas as pd


def cohort_digest(table: pd.DataFrame, columns: list[str]) -> str:
    """Hash of a cohort's content: its rows, labels, patients, sites, clinical and baseline
    values (`columns` of `table`) and the bytes of every image file. Editing a label,
    deleting a row or replacing an image changes it; touching a file does not."""
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(table[columns], index=False).to_numpy().tobytes())
    for path in table["path"]:
        h.update(_file_hash(path))
    return h.hexdigest()[:16]


def _file_hash(path: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()
