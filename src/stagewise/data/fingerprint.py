"""Content digests of what a study's numbers depend on, so that edited data is never mixed
with old results: the cohort (`cohort_digest`: part of every fold's fingerprint and of a
federated job's image cache key) and the other files an arm reads (`arm_inputs_digest`: a
`file:`/`run:` backbone's weights, each source manifest of a pretrain or ssl stage and its
images)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd

from stagewise.models.files import pretrained_in_run
from stagewise.recipe import ArmConfig


def cohort_digest(table: pd.DataFrame, columns: list[str]) -> str:
    """Hash of a cohort's content: its rows, labels, patients, sites, clinical and baseline
    values (`columns` of `table`) and the bytes of every image file. Editing a label,
    deleting a row or replacing an image changes it; touching a file does not."""
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(table[columns], index=False).to_numpy().tobytes())
    for path in table["path"]:
        h.update(_file_hash(path))
    return h.hexdigest()[:16]


def arm_inputs_digest(arm: ArmConfig) -> str | None:
    """Hash of the bytes of every file an arm reads besides the cohort: its backbone's weights
    file (`file:`, `run:`, `backbone.weights`) and each source manifest with the images it
    lists. None when it reads none (a library backbone, no source stage), so that the
    fingerprints of such arms stay those of earlier runs. A file that cannot be read counts
    as missing; the study's checks say why it cannot be used."""
    files = _weights_files(arm)
    for stage in arm.stages:
        if stage.external and getattr(stage, "source", None) is not None:
            files += _source_files(stage.source.manifest, stage.source.root, stage.source.image)
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        h.update(_cached_hash(path))
    return h.hexdigest()[:16]


def _weights_files(arm: ArmConfig) -> list[Path]:
    name, files = arm.backbone.name, []
    while name.startswith("dual:"):
        name = name.removeprefix("dual:")
    source, _, rest = name.partition(":")
    if source == "file":
        files.append(Path(rest).expanduser())
    elif source == "run":
        try:
            files.append(pretrained_in_run(rest))
        except Exception:  # noqa: BLE001 - the backbone check names the problem
            files.append(Path(rest.partition("#")[0]).expanduser() / "pretrained")
    if arm.backbone.weights is not None:
        files.append(Path(arm.backbone.weights).expanduser())
    return files


def _source_files(manifest: Path, root: Path | None, column: str) -> list[Path]:
    """A source manifest and the images it lists (as `data.source.load_source` finds them)."""
    files = [Path(manifest)]
    try:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except Exception:  # noqa: BLE001 - unreadable: its bytes alone count; the checks say why
        return files
    base = Path(root) if root else Path(manifest).parent
    for raw in df.get(column, pd.Series(dtype=str)).str.strip():
        files.append(Path(raw) if Path(raw).is_absolute() else base / raw)
    return files


_HASHES: dict[tuple, bytes] = {}


def _cached_hash(path: Path) -> bytes:
    """`_file_hash`, kept while the file's size, times and inode stay the same (a replaced or
    rewritten file always has a new change time), so that a study's many fingerprints read a
    large source cohort once."""
    try:
        st = os.stat(path)
    except OSError:
        return b"missing"
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _HASHES:
        try:
            _HASHES[key] = _file_hash(path)
        except OSError:
            return b"unreadable"
    return _HASHES[key]


def _file_hash(path: str | Path) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()
