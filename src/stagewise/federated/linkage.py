"""Finding a patient treated at two hospitals of a deployment, without telling the coordinator who.

Each hospital holds its own manifest, so one child transferred between two units is two
patients to stagewise: counted twice, and possibly in one site's training rows while being
in another's test rows (the patient-grouped folds hold within a site only). The hospitals
can find such patients with a **linkage key**: a secret they agree on and never give the
coordinator (privacy-preserving record linkage as registries do it: a keyed hash of the
identifier, HMAC-SHA256). Each site sends the keyed hashes of its patient ids with its
greeting; the coordinator counts those present at more than one site. Without the key it
cannot invert them (patient ids are guessable, so an unkeyed or coordinator-known salt would
not protect them); it learns only how many patients the sites share.

Linkage is exact: the same id written the same way at both hospitals (after trimming and
case-folding). Hospitals whose ids differ for the same child need a common id first.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections import Counter
from itertools import combinations
from pathlib import Path

from stagewise.errors import StagewiseError

KEY_BYTES = 32
LINK_CHARS = 16  # 64 bits of the HMAC: no chance collision among any cohort's patients


class LinkageKeyError(StagewiseError):
    """A linkage key file that cannot be used."""


def write_linkage_key(path: Path) -> Path:
    """A new random linkage key, readable by its owner only; never replaces an existing one
    (the hospitals' copies must stay the same)."""
    path = Path(path)
    if path.exists():
        raise LinkageKeyError(f"{path} exists: a linkage key is never replaced (every hospital must hold the same "
                              "one); give another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
    return path


def read_linkage_key(path: Path) -> bytes:
    """The key's bytes; a clear error for a missing, empty or malformed file."""
    path = Path(path)
    try:
        text = path.read_text().strip()
    except OSError as err:
        raise LinkageKeyError(f"linkage key {path}: {err.strerror or err}; make one with "
                              "`stagewise federation linkage-key -o FILE` and copy it to every hospital") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise LinkageKeyError(f"linkage key {path}: not a key made by `stagewise federation linkage-key` "
                              f"(expected {2 * KEY_BYTES} hexadecimal characters)")
    return key


def patient_links(key: bytes, patient_ids) -> list[str]:
    """Sorted, unique keyed hashes of the patient ids (trimmed, case-folded)."""
    ids = {str(p).strip().casefold() for p in patient_ids}
    return sorted(hmac.new(key, p.encode(), hashlib.sha256).hexdigest()[:LINK_CHARS] for p in ids)


def greeting_links(key_file: Path | None, patient_ids) -> dict:
    """What a site adds to its greeting: the key's check and its patients' keyed hashes
    (nothing without a key). The coordinator cannot read the ids back from them."""
    if key_file is None:
        return {}
    key = read_linkage_key(key_file)
    return {"linkage-check": key_check(key), "patient-links": ",".join(patient_links(key, patient_ids))}


def key_check(key: bytes) -> str:
    """A digest that shows two sites hold the same key without showing the key."""
    return hmac.new(key, b"stagewise linkage key check", hashlib.sha256).hexdigest()[:LINK_CHARS]


NOT_LINKED = "patients were not linked across sites: a patient treated at two hospitals is counted at each"


def shared_patients(links: dict[str, list[str] | None], checks: dict[str, str | None]) -> dict:
    """What the coordinator records: whether the sites' patients were linked, and how many
    patients appear at more than one site, overall and per pair of sites. A site that sent
    no links (no key), or sites holding different keys, make the check incomplete, and the
    record says which."""
    missing = sorted(s for s, v in links.items() if v is None)
    if missing:
        return {"checked": False, "sites_without_linkage_key": missing, "note": NOT_LINKED}
    if len(set(checks.values())) > 1:
        return {"checked": False, "note": f"the sites hold different linkage keys; {NOT_LINKED}"}
    given = {s: set(v) for s, v in links.items()}
    seen = Counter(link for v in given.values() for link in v)
    pairs = {f"{a}+{b}": len(given[a] & given[b]) for a, b in combinations(sorted(given), 2)}
    return {"checked": True, "patients_at_several_sites": sum(1 for c in seen.values() if c > 1),
            "per_pair": {k: v for k, v in pairs.items() if v}}


def linkage_warning(record: dict) -> str | None:
    """The coordinator's warning when patients were found at several sites."""
    if not record.get("patients_at_several_sites"):
        return None
    pairs = ", ".join(f"{k}: {v}" for k, v in record["per_pair"].items())
    return (f"{record['patients_at_several_sites']} patient(s) appear at more than one site ({pairs}): each site "
            "counts them, and one site may train on a patient another site tests on")


def linkage_line(record: dict) -> str:
    """One line for the coordinator's screen: what the linkage check found, or why none ran."""
    if not record.get("checked"):
        return f"patients across sites: {record['note']} (`federation site --linkage-key`)"
    return linkage_warning(record) or "patients across sites: linked by the hospitals' key; none appears at two sites"
