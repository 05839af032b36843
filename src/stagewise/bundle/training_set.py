"""What a bundle was trained on, in a form that names no patient and no file
(`training_set.json`), and the overlap of another cohort with it.

An external validation means something only on images the model never trained on. Public
chest X-ray collections share images (the same Hannover films sit in two repositories under
other names and ids), so a bundle records, for every image that trained it: a salted SHA-256
of its decoded pixels (`data.image_digest.content_digest`: the reader's float32 pixels before
resizing, so a renamed or re-encoded copy with the same pixels matches), a 64-bit perceptual
hash (to find near-duplicates), and the salted SHA-256 of each training patient's id. The
salt is drawn per bundle. The lists are sorted by value, so neither ties an image to a
patient nor keeps the manifest's row order. `stagewise evaluate` computes the same values for
its cohort with the bundle's salt (`find_overlap`).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stagewise.data import Cohort
from stagewise.data.image_digest import NEAR_DUPLICATE_BITS, PERCEPTUAL, hamming, image_fingerprints, salted_digest
from stagewise.data.readers import INTENSITY_CONVENTION
from stagewise.data.source import load_source
from stagewise.errors import RunError
from stagewise.evaluation.splits import cohort_splits
from stagewise.io import atomic_write
from stagewise.recipe import Recipe

TRAINING_SET_FILE = "training_set.json"
FORMAT = "stagewise-training-set-1"
ABOUT = ("what this bundle's model was trained on, identifying no patient: salted SHA-256 digests of each training "
         "image's decoded pixels and of each training patient's id (the salt is this bundle's own), and a 64-bit "
         "perceptual hash (difference hash) of each training image, which can show that an image one holds is the "
         "same or nearly the same picture; the lists are sorted by value, unlinked to each other")


def training_rows(recipe: Recipe, cohort: Cohort, fold: str | None) -> np.ndarray:
    """The cohort rows a bundle's model trained on: every row for a refit (pooled or
    federated), the training part of `fold` (e.g. r0-f0) for a fold model."""
    if fold is None:
        return np.arange(cohort.n_images)
    for split in cohort_splits(cohort.table, recipe.protocol, recipe.seed):
        if split.name == fold:
            return split.train
    raise RunError(f"the run's protocol has no fold {fold!r}")


def source_images(recipe: Recipe, arms: list[str]) -> list[str]:
    """Image files of the arms' stages on source manifests (pretrain, ssl): they trained the
    backbone too."""
    paths: list[str] = []
    for arm in (a for a in recipe.arms if a.name in arms):
        for stage in arm.stages:
            if stage.external:
                paths += load_source(stage.source).paths
    return list(dict.fromkeys(paths))


def record_training_set(recipe: Recipe, cohort: Cohort, arms: list[str], fold: str | None) -> dict:
    """The training set of a bundle of `arms` (see the module docstring): of the cohort as
    the study read it, the rows that trained the model (`training_rows`), every image decoded;
    and the images of the arms' stages on source manifests."""
    rows = training_rows(recipe, cohort, fold)
    cohort_paths = cohort.table["path"].iloc[rows].tolist()
    sources = [p for p in source_images(recipe, arms) if p not in set(cohort_paths)]
    salt = secrets.token_hex(16)
    prints = image_fingerprints(cohort_paths + sources)
    patients = sorted({salted_digest(salt, "patient", str(p).encode()) for p in cohort.table["patient"].iloc[rows]})
    return {
        "about": ABOUT, "format": FORMAT, "salt": salt,
        "pixels": f"sha256(salt, 'pixels', blake2b-128(shape, float32 pixels as read under {INTENSITY_CONVENTION}, "
                  "before resizing))",
        "patient_ids": "sha256(salt, 'patient', the id as text)",
        "perceptual": PERCEPTUAL, "near_duplicate_bits": NEAR_DUPLICATE_BITS,
        "images": {"cohort": len(cohort_paths), "source_manifests": len(sources)},
        "patients": len(patients),
        "pixel_digests": sorted(salted_digest(salt, "pixels", d) for d, _ in prints),
        "perceptual_hashes": sorted(h for _, h in prints),
        "patient_digests": patients,
    }


def training_set_summary(record: dict) -> dict:
    """What bundle.json says of its training set (the file, counts, the perceptual hash)."""
    return {"file": TRAINING_SET_FILE, "images": record["images"]["cohort"],
            "source_manifest_images": record["images"]["source_manifests"],
            "recalibration_images": record["images"].get("recalibration", 0), "patients": record["patients"],
            "perceptual": record["perceptual"], "near_duplicate_bits": record["near_duplicate_bits"]}


def write_training_set(folder: Path, record: dict) -> None:
    atomic_write(folder / TRAINING_SET_FILE, json.dumps(record))


def read_training_set(bundle_dir: Path) -> dict | None:
    """The bundle's training_set.json, or None (a bundle exported before it existed, or a
    file that is not one: overlap cannot be checked)."""
    try:
        data = json.loads((Path(bundle_dir) / TRAINING_SET_FILE).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("format") == FORMAT and all(
        k in data for k in ("salt", "pixel_digests", "perceptual_hashes", "patient_digests"))
    return data if ok else None


@dataclass
class Overlap:
    """Per image of an evaluated cohort: same pixels as a training image (`identical`), else
    within `near_duplicate_bits` of one's perceptual hash (`near`); per image, its patient's
    salted id among the training patients' (`patient`); and its own values under the bundle's
    salt (`pixel_digests`, `perceptual_hashes`, `patient_digests`)."""

    identical: np.ndarray
    near: np.ndarray
    patient: np.ndarray
    pixel_digests: list[str]
    perceptual_hashes: list[str]
    patient_digests: list[str]

    @property
    def image(self) -> np.ndarray:
        return self.identical | self.near


def find_overlap(record: dict, paths: list[str], patients: list[str]) -> Overlap:
    """Decode each image of another cohort and compare it, and its patient id, with the
    bundle's training set under the bundle's salt."""
    salt, bits = record["salt"], int(record.get("near_duplicate_bits", NEAR_DUPLICATE_BITS))
    prints = image_fingerprints(paths)
    pixels = [salted_digest(salt, "pixels", d) for d, _ in prints]
    perceptual = [h for _, h in prints]
    ids = [salted_digest(salt, "patient", str(p).encode()) for p in patients]
    known, known_ids = set(record["pixel_digests"]), set(record["patient_digests"])
    identical = np.array([d in known for d in pixels], dtype=bool)
    near = np.zeros(len(paths), dtype=bool)
    if prints and record["perceptual_hashes"]:
        near = (hamming(perceptual, record["perceptual_hashes"]).min(axis=1) <= bits) & ~identical
    patient = np.array([d in known_ids for d in ids], dtype=bool)
    return Overlap(identical, near, patient, pixels, perceptual, ids)


def with_recalibration(record: dict, overlap: Overlap, rows: np.ndarray) -> dict:
    """The training set of a bundle recalibrated on `rows` of an evaluated cohort (`overlap`
    of that cohort with `record`): the record's, plus those images and their patients, since a
    later evaluation on them would not be independent of the recalibration either."""
    rows = np.asarray(rows, dtype=int)
    out = dict(record)
    out["pixel_digests"] = sorted(record["pixel_digests"] + [overlap.pixel_digests[i] for i in rows])
    out["perceptual_hashes"] = sorted(record["perceptual_hashes"] + [overlap.perceptual_hashes[i] for i in rows])
    out["patient_digests"] = sorted(set(record["patient_digests"]) | {overlap.patient_digests[i] for i in rows})
    out["images"] = {**record["images"], "recalibration": record["images"].get("recalibration", 0) + len(rows)}
    out["patients"] = len(out["patient_digests"])
    return out
