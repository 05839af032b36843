"""Read and check a cohort manifest: one CSV row per image, with outcome and patient.

Every problem in the manifest is collected and reported in one error, each naming the
CSV line, so a user fixes the spreadsheet in one pass instead of one crash per typo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stagewise.data.characteristics import characteristics, prepare_steps
from stagewise.data.cohort_rows import CohortRows
from stagewise.data.manifest_csv import column_problems, read_manifest, separator_note, wanted_columns
from stagewise.data.problems import MANIFEST_HINT, CohortError, file_key  # noqa: F401 - importable from here
from stagewise.recipe import CohortConfig


def _counts(table: pd.DataFrame) -> dict:
    labels = table.groupby("patient", sort=False)["y"].first()
    pos_images, pos_patients = int(table["y"].sum()), int(labels.sum())
    return {
        "images": len(table),
        "patients": len(labels),
        "positive_images": pos_images,
        "negative_images": len(table) - pos_images,
        "positive_patients": pos_patients,
        "negative_patients": len(labels) - pos_patients,
        "prevalence_patients": pos_patients / len(labels) if len(labels) else float("nan"),
    }


@dataclass
class Cohort:
    """A checked manifest: `table` has row, path (absolute), y (0/1), patient, [site], and
    the clinical/baseline columns as floats; manifest row order is kept."""

    table: pd.DataFrame
    config: CohortConfig
    dropped: list[str] = field(default_factory=list)
    """One message per manifest row left out (drop_missing_outcome), for the run log."""
    warnings: list[str] = field(default_factory=list)
    """Doubts that do not stop a run (load_cohort(decode=True): nearly black images, one
    image twice for a patient); each line already lists every row concerned: show once."""
    groups: pd.DataFrame = field(default_factory=pd.DataFrame)
    """The subgroup levels (`row` and one text column per `cohort.subgroups` column), row for
    row with `table`; kept out of `table`, whose columns every fold's fingerprint hashes."""
    flow: dict = field(default_factory=dict)
    """Participant flow: manifest rows read, dropped for an empty outcome, images kept; and
    `before_manifest`, the rows a prepare script says it left out (`prepare_steps`)."""

    @property
    def n_images(self) -> int:
        return len(self.table)

    @property
    def n_patients(self) -> int:
        return int(self.table["patient"].nunique())

    @property
    def patients(self) -> np.ndarray:
        """Unique patient ids in first-appearance order, so folds are reproducible."""
        return self.table["patient"].drop_duplicates().to_numpy(dtype=object)

    @property
    def tasks(self) -> list[str]:
        """Outcome names, the primary (stratified, compared) first."""
        return [self.config.outcome, *self.config.extra_outcomes]

    def targets(self) -> np.ndarray:
        """(images, tasks) labels: 0/1, NaN where a secondary outcome is missing."""
        extra = [self.table[f"y:{t}"].to_numpy(dtype=np.float64) for t in self.config.extra_outcomes]
        return np.column_stack([self.table["y"].to_numpy(dtype=np.float64), *extra])

    def patient_labels(self) -> pd.Series:
        """Outcome per patient (consistent within a patient, as load_cohort checks)."""
        return self.table.groupby("patient", sort=False)["y"].first()

    @property
    def prevalence(self) -> float:
        """Fraction of positive patients: the rate a patient-level threshold refers to."""
        return float(self.patient_labels().mean())

    def summary(self) -> dict:
        """Counts of images, patients and outcomes (per site too), and per clinical or baseline
        column how many rows lack a value (the report's missing-data item states them)."""
        out = _counts(self.table)
        if "site" in self.table:
            out["sites"] = {str(s): _counts(t) for s, t in self.table.groupby("site", sort=False)}
        if self.flow:
            out["flow"] = self.flow | {"patients": out["patients"]}
        out["characteristics"] = characteristics(self.table, self.groups, self.config.subgroups)
        columns = list(dict.fromkeys([*self.config.clinical, *self.config.baselines]))
        if columns:
            out["missing"] = {c: {"rows": int(self.table[c].isna().sum()), "of_rows": int(len(self.table)),
                                  "patients": int(self.table.loc[self.table[c].isna(), "patient"].nunique())}
                              for c in columns if c in self.table}
        return out


def load_cohort(cfg: CohortConfig, *, decode: bool = False, workers: int | None = None,
                sites_hold_patients: bool = True) -> Cohort:
    """Read and check the manifest; every problem is reported together, before any training.

    decode=True also decodes every image file (`check_images`, `workers` threads): files
    that cannot be read, tiny or constant images and one image under two patients are
    reported in the same CohortError as the manifest's problems; doubts that do not stop a
    run (nearly black images, ...) land in `Cohort.warnings`.

    A study's site holds whole patients (leave-one-site-out, federated training), so a patient
    id at two sites is refused; `sites_hold_patients=False` (an external validation, whose
    "site" only groups figures, e.g. by view) lets one patient's images lie at several.

    The steps (`cohort_rows.CohortRows`) run in a fixed order, because the order of the
    messages is the order a user reads and fixes them in.
    """
    manifest = Path(cfg.manifest)
    df, sep = read_manifest(manifest, wanted_columns(cfg))
    columns = set(df.columns)
    problems = column_problems(cfg, list(df.columns))
    problems += separator_note(cfg, manifest, sep, columns, problems)
    rows = CohortRows(cfg, manifest, df, problems)
    rows.check_outcomes()
    rows.read_ids()
    rows.check_image_paths()
    rows.check_patients()
    rows.check_sites(sites_hold_patients)
    rows.read_numeric()
    rows.read_subgroups()
    rows.read_extra_outcomes()
    rows.check_both_classes()
    if decode and rows.paths:
        rows.check_images(workers)
    rows.raise_problems()
    flow = rows.flow()
    if steps := prepare_steps(manifest):
        flow["before_manifest"] = steps
    return Cohort(table=rows.table(), config=cfg, dropped=rows.dropped_notes(), warnings=rows.image_warnings,
                  groups=rows.groups(), flow=flow)
