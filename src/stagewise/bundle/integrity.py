"""A bundle's files checked against each other before it scores anything.

A bundle is copied between machines and accounts; a file changed or damaged on the way (an
edited head bias, a new `image_size`, a hand-added recalibration, a truncated copy) would
otherwise score silently with numbers nobody validated. At export (`export.build_bundle`,
the one writer of every bundle) `seal` records in bundle.json the SHA-256 of every other file
of the bundle and of bundle.json's own content without that record; at load (`Bundle.load`)
`verify` recomputes them and refuses any difference, naming the file and what to do. The
digests catch accidents and edits, not a forger who recomputes them: they are no signature.
A bundle exported before the digests existed still loads, with a one-line notice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stagewise.errors import RunError

INTEGRITY = "integrity"
BUNDLE_JSON = "bundle.json"
_ALGORITHM = "sha256"
_AGAIN = "copy the whole bundle folder again from where it was exported, or export it again from its run"


class BundleError(RunError):
    """A bundle that cannot be used as it is; the message names the file and what to do."""


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def info_digest(info: dict) -> str:
    """SHA-256 of bundle.json's content less its integrity record (keys sorted, no spacing)."""
    rest = {k: v for k, v in info.items() if k != INTEGRITY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(folder: Path) -> dict:
    """Record in `folder`/bundle.json the digests of every other file of the bundle and of its
    own content; returns the record. Called on a finished bundle, before it moves into place."""
    path = folder / BUNDLE_JSON
    info = json.loads(path.read_text())
    files = {f.name: file_digest(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != BUNDLE_JSON}
    info[INTEGRITY] = {"algorithm": _ALGORITHM, "files": files, BUNDLE_JSON: info_digest(info),
                       "about": "SHA-256 of each file of the bundle and of this file's content without this record, "
                                "checked whenever the bundle is loaded"}
    path.write_text(json.dumps(info, indent=2))
    return info[INTEGRITY]


def verify(folder: Path, info: dict, required: tuple[str, ...]) -> str | None:
    """Check the bundle in `folder` (its bundle.json read as `info`) against its recorded
    digests; raise BundleError naming the first file that is missing or differs. Returns a
    one-line notice for a bundle that records no digests (exported before they existed)."""
    record = info.get(INTEGRITY)
    if record is None:
        return ("this bundle records no digests of its files (exported by an earlier stagewise), so a change to it "
                "cannot be detected; export it again from its run to have it checked")
    if not isinstance(record, dict) or record.get("algorithm") != _ALGORITHM or not isinstance(record.get("files"), dict):
        raise BundleError(f"{folder / BUNDLE_JSON}: its '{INTEGRITY}' record is damaged; {_AGAIN}")
    if record.get(BUNDLE_JSON) != info_digest(info):
        raise BundleError(f"{folder / BUNDLE_JSON} was changed after export (its content no longer matches the digest it "
                          f"recorded), so its thresholds, outputs or preprocessing may not be those validated; {_AGAIN} "
                          "(a recalibration is made with `stagewise evaluate --recalibrate`)")
    files = record["files"]
    for name in required:
        if name not in files:
            raise BundleError(f"{folder / BUNDLE_JSON}: its digests do not cover {name}; {_AGAIN}")
    for name, digest in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise BundleError(f"{folder / BUNDLE_JSON}: its digests name {name!r}, not a file of the bundle; {_AGAIN}")
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{path} is missing: the bundle is incomplete; {_AGAIN}")
        if file_digest(path) != digest:
            raise BundleError(f"{path} differs from the file exported with this bundle (its SHA-256 is not the one "
                              f"bundle.json recorded): it was changed or damaged after export; {_AGAIN}")
    return None
