"""Is the evaluated cohort external? Its overlap with the bundle's training set.

A cohort is called external only when the bundle records its training set
(`bundle.training_set`) and none of the cohort's images (same decoded pixels, or a perceptual
hash within a few bits: a near-duplicate) and none of its patients' ids (under the bundle's
salt) are in it. When some are, the evaluation is scored twice, on every patient and without
every patient who has an overlapping image or id (all that patient's images), and says plainly
that it is not an external validation. A bundle that records no training set gets a sentence
saying that overlap could not be checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stagewise.bundle.training_set import Overlap, find_overlap, read_training_set, with_recalibration
from stagewise.data import Cohort
from stagewise.external.manifest import patient_table
from stagewise.external.validation import comparison, validation_figures
from stagewise.text import counted

LIMITS = ("The check finds copies with the same decoded pixels and near-duplicates (re-encoded or slightly edited "
          "copies), not copies that were cropped, rotated or processed otherwise, nor a patient filed under another id.")
"""What the check cannot see, said with every result (external.json `overlap.limits`)."""

IDENTICAL, NEAR, PATIENT = "identical pixels", "near-duplicate", "patient id"
"""How a row of the evaluated cohort is in the training set (predictions-images.csv)."""


@dataclass
class CohortOverlap:
    record: dict
    """external.json's `overlap`: the counts, `external` (True, False, or None: not checked), `sentence`."""
    flag: np.ndarray
    """Per cohort row: IDENTICAL, NEAR, PATIENT (only its patient's id matches) or ""."""
    excluded: np.ndarray
    """Per cohort row: its patient has an overlapping image or id (left out of the figures without overlap)."""
    training_set: dict | None = field(default=None, repr=False)
    """The bundle's training_set.json (None: it has none)."""
    found: Overlap | None = field(default=None, repr=False)

    def recalibrated(self, rows: np.ndarray) -> dict | None:
        """The training set of the bundle recalibrated on these cohort rows (None without one)."""
        return with_recalibration(self.training_set, self.found, rows) if self.training_set else None


def check_overlap(bundle_dir: Path, cohort: Cohort, missing: str | None = None) -> CohortOverlap:
    """Compare every image and patient of `cohort` with the bundle's training set. `missing`:
    why the bundle has none (bundle.json's `training_set_missing`; else it is an older bundle)."""
    t = cohort.table
    n, patients = len(t), t["patient"].astype(str).to_numpy()
    record = read_training_set(bundle_dir)
    if record is None:
        why = missing or "it was exported before stagewise recorded one"
        sentence = (f"This bundle does not record its training set ({why}), so "
                    "whether images or patients of this cohort were in its training could not be checked: call this "
                    "an external validation only if you know that none were.")
        return CohortOverlap({"checked": False, "external": None, "sentence": sentence}, np.full(n, "", dtype=object),
                             np.zeros(n, dtype=bool))
    found = find_overlap(record, t["path"].tolist(), patients.tolist())
    flag = np.where(found.identical, IDENTICAL, np.where(found.near, NEAR, np.where(found.patient, PATIENT, ""))).astype(object)
    bad_patients = set(patients[found.image | found.patient])
    excluded = np.isin(patients, list(bad_patients))
    with_images = len(set(patients[found.image]))
    id_match = len(set(patients[found.patient]))
    counts = {
        "images": n, "patients": int(len(set(patients))),
        "images_identical": int(found.identical.sum()), "images_near_duplicate": int(found.near.sum()),
        "images_in_training_set": int(found.image.sum()), "patients_with_training_images": with_images,
        "patients_id_match": id_match, "patients_overlapping": len(bad_patients),
        "images_of_overlapping_patients": int(excluded.sum()),
    }
    stated = {"checked": True, "external": not bad_patients, "perceptual": record.get("perceptual"),
              "near_duplicate_bits": record.get("near_duplicate_bits"),
              "training_set": {"images": sum((record.get("images") or {}).values()), "patients": len(record["patient_digests"])},
              **counts}
    stated["sentence"], stated["limits"] = overlap_sentence(stated), LIMITS
    return CohortOverlap(stated, flag, excluded, record, found)


def overlap_sentence(r: dict) -> str:
    """The plain statement of the overlap counts (see `check_overlap`)."""
    bits = f"perceptual hashes within {r['near_duplicate_bits']} of 64 bits"
    if r["external"]:
        return (f"No image of this cohort ({counted(r['images'], 'image')}) is in the bundle's training set "
                f"({counted(r['training_set']['images'], 'image')}, {counted(r['training_set']['patients'], 'patient')}), "
                f"neither with identical pixels nor as a near-duplicate ({bits}), and none of its "
                f"{counted(r['patients'], 'patient')} has the id of a training patient.")
    parts = []
    if r["images_in_training_set"]:
        parts.append(f"{r['images_in_training_set']} of {counted(r['images'], 'image')} "
                     f"({counted(r['patients_with_training_images'], 'patient')}) were in the bundle's training set "
                     f"({r['images_identical']} with identical pixels, {counted(r['images_near_duplicate'], 'near-duplicate')}: "
                     f"{bits})")
    if r["patients_id_match"]:
        parts.append(f"{r['patients_id_match']} of {counted(r['patients'], 'patient')} "
                     f"{'has' if r['patients_id_match'] == 1 else 'have'} the id of a training patient" + ("" if r["images_in_training_set"] else
                                  " (ids of different hospitals can coincide by chance: check whether they are the same people)"))
    return ("; ".join(parts) + ": this is not an external validation. The figures without these "
            f"{counted(r['patients_overlapping'], 'patient')} ({counted(r['images_of_overlapping_patients'], 'image')}) "
            "are given beside those on every patient; they leave out only the overlap found.")


def figures_without(cohort: Cohort, prob: np.ndarray, excluded: np.ndarray, test_images: str, aggregate: str,
                    threshold: float, n_boot: int, seed: int, development: dict) -> dict:
    """The evaluation's figures on the cohort without the overlapping patients' rows: exactly
    those of the same evaluation on a manifest without those rows (same patient scores, same
    bootstrap seed). external.json's `without_overlap`."""
    keep = ~np.asarray(excluded, dtype=bool)
    rest = Cohort(cohort.table[keep].reset_index(drop=True), cohort.config)
    summary = rest.summary()
    if not keep.any():
        return {"available": False, "cohort": summary, "reason": "every patient of this cohort overlaps the training set"}
    table, used = patient_table(rest, prob[keep], test_images, aggregate)
    figures = validation_figures(table, threshold, n_boot, seed)
    return {"available": True, "cohort": summary | {"images_scored": int(used.sum())}, "external": figures,
            "comparison": comparison(figures, development)}
