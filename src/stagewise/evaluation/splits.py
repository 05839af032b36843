"""Cross-validation splits that never put one patient on both sides."""

from __future__ import annotations

import hashlib

from dataclasses import dataclass

import numpy as np

from stagewise.recipe import ProtocolConfig
from stagewise.errors import StagewiseError


class SplitError(StagewiseError, ValueError):
    """A protocol the cohort cannot support (too few patients of a class for the folds)."""


@dataclass(frozen=True)
class Split:
    repeat: int
    fold: int
    train: np.ndarray
    """Row positions (into the cohort table) used for training: every image of a training patient."""
    test: np.ndarray
    """Row positions scored: every image, or the first image, of each test patient."""

    @property
    def name(self) -> str:
        return f"r{self.repeat}-f{self.fold}"


def make_splits(
    y: np.ndarray, patients: np.ndarray, protocol: ProtocolConfig, seed: int, sites: np.ndarray | None = None
) -> list[Split]:
    """Repeated stratified group k-fold (one StratifiedGroupKFold per repeat, seeded),
    leave-one-site-out, or the BPD code's balanced test folds; always grouped by patient."""
    from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold  # here: a job's CLI reads no folds

    y, patients = np.asarray(y), np.asarray(patients)
    if protocol.kind == "leave_one_site_out":
        if sites is None:
            raise SplitError("leave_one_site_out needs a site column")
        iterators = [(0, LeaveOneGroupOut().split(y, y, groups=sites))]
    elif protocol.kind == "balanced_test":
        iterators = [(r, balanced_test_folds(y, patients, protocol.folds, seed + r)) for r in range(protocol.repeats)]
    else:
        per_class = {c: len(np.unique(patients[y == c])) for c in np.unique(y)}
        short = {int(c): n for c, n in per_class.items() if n < protocol.folds}
        if short:
            raise SplitError(
                f"{protocol.folds} folds need at least {protocol.folds} patients of each outcome; "
                f"patients per outcome: {({int(c): n for c, n in per_class.items()})}. Lower protocol.folds."
            )
        iterators = [
            (r, StratifiedGroupKFold(protocol.folds, shuffle=True, random_state=seed + r).split(y, y, groups=patients))
            for r in range(protocol.repeats)
        ]
    splits = []
    for repeat, it in iterators:
        for fold, (train, test) in enumerate(it):
            if protocol.test_images == "first":
                _, first = np.unique(patients[test], return_index=True)
                test = test[np.sort(first)]
            splits.append(Split(repeat, fold, np.sort(train), np.sort(test)))
    return splits


def cohort_splits(table, protocol: ProtocolConfig, seed: int) -> list[Split]:
    """The splits of a checked cohort table (columns y, patient, [site]) under the protocol:
    those a study trains, and so those an export names a fold's training rows by."""
    sites = table["site"].to_numpy() if "site" in table else None
    return make_splits(table["y"].to_numpy(), table["patient"].to_numpy(), protocol, seed, sites)


def balanced_test_folds(y: np.ndarray, patients: np.ndarray, k: int, seed: int):
    """(train rows, test rows) of the BPD code's fold construction, for one repeat: positive
    patients permuted and cut into k chunks (numpy's array_split), negatives permuted by the
    same RandomState, and each chunk's test fold takes the next as many negatives; training
    is every other patient. Surplus negatives are never tested (see ProtocolConfig.kind)."""
    order = list(dict.fromkeys(patients.tolist()))  # patients in manifest order
    label = dict(zip(patients.tolist(), y.tolist()))
    pos = np.array([p for p in order if label[p] == 1], dtype=object)
    neg = np.array([p for p in order if label[p] == 0], dtype=object)
    if len(pos) < k or len(neg) < len(pos):
        raise SplitError(
            f"protocol.kind balanced_test needs at least {k} positive patients and as many negative as positive "
            f"ones; the cohort has {len(pos)} positive and {len(neg)} negative. Use kind group_kfold."
        )
    rng = np.random.RandomState(seed)
    pos, neg = rng.permutation(pos), rng.permutation(neg)
    taken = 0
    for chunk in np.array_split(pos, k):
        tested = np.isin(patients, np.concatenate([chunk, neg[taken:taken + len(chunk)]]))
        taken += len(chunk)
        yield np.flatnonzero(~tested), np.flatnonzero(tested)


def subsample_patients(idx: np.ndarray, y: np.ndarray, patients: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows of a stratified random `fraction` of the patients in `idx` (at least one per class).

    Whole patients are kept or dropped, so a label-efficiency curve never splits a patient.
    """
    if fraction >= 1.0:
        return idx
    rng = np.random.default_rng(seed)
    p, first = np.unique(patients[idx], return_index=True)
    labels = y[idx][first]
    keep = []
    for c in np.unique(labels):
        members = p[labels == c]
        n = max(1, int(round(fraction * len(members))))
        keep.append(rng.choice(members, size=n, replace=False))
    return idx[np.isin(patients[idx], np.concatenate(keep))]


def fold_seed(seed: int, split: Split) -> int:
    """Seed of one fold, shared by all arms (paired design) and independent of run order."""
    digest = hashlib.blake2b(f"{seed}:{split.repeat}:{split.fold}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF
