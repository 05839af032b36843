"""Read and check a cohort manifest: one CSV row per image, with outcome and patient.

Every problem in the manifest is collected and reported in one error, each naming the
CSV line, so a user fixes the spreadsheet in one pass instead of one crash per typo.
"""

from __future__ import annotations

import difflib
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from stagewise.recipe import CohortConfig

_MAX_SHOWN = 50
# Table columns the loader owns; a clinical column with one of these names would be overwritten.
_RESERVED = ("row", "path", "y", "patient", "site")
_HINT = (
    "Fix these in the manifest (row numbers are line numbers in the CSV file, the header "
    "being line 1) or in the recipe's cohort section, then run again."
)


class CohortError(ValueError):
    """All problems with a cohort at once; `problems` holds one line per problem."""

    def __init__(self, problems: Iterable[str], manifest: str | Path | None = None, hint: str = _HINT):
        self.problems = list(problems)
        self.manifest = None if manifest is None else str(manifest)
        self.hint = hint
        super().__init__(self._message())

    def __reduce__(self):
        # Default pickling would call CohortError(message): keep the fields across processes.
        return (type(self), (self.problems, self.manifest, self.hint))

    def _message(self) -> str:
        n = len(self.problems)
        where = f"{self.manifest}: " if self.manifest else ""
        lines = [f"{where}{n} problem{'' if n == 1 else 's'} in the cohort:"]
        lines += [f"  - {p}" for p in self.problems[:_MAX_SHOWN]]
        if n > _MAX_SHOWN:
            lines.append(f"  ... and {n - _MAX_SHOWN} more")
        lines.append(self.hint)
        return "\n".join(lines)


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
        out = _counts(self.table)
        if "site" in self.table:
            out["sites"] = {str(s): _counts(t) for s, t in self.table.groupby("site", sort=False)}
        return out


def _rows(lines: list[int]) -> str:
    return f"row{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}"


def _read_manifest(manifest: Path) -> pd.DataFrame:
    """The manifest as strings, indexed by CSV line number (header = line 1)."""
    if not manifest.is_file():
        raise CohortError(
            [f"manifest not found: {manifest}"],
            manifest,
            hint="Check `manifest:` in the recipe's cohort section (relative to the recipe file).",
        )
    problem = None
    try:
        # skip_blank_lines=False keeps the index aligned with line numbers; blank rows go below.
        df = pd.read_csv(
            manifest, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig"
        )
    except UnicodeDecodeError:
        problem = "the manifest is not UTF-8 text; save it as 'CSV UTF-8'"
    except pd.errors.EmptyDataError:
        problem = "the manifest is empty; it needs a header line and one row per image"
    except (pd.errors.ParserError, OSError) as err:
        problem = f"the manifest cannot be read as CSV: {err}"
    if problem is None:
        df = df.fillna("")  # short rows give NaN in some pandas versions
        df.columns = [str(c).strip() for c in df.columns]
        df.index = df.index + 2
        df = df[~(df == "").all(axis=1)]
        if df.empty:
            problem = "the manifest has no rows; it needs one row per image below the header"
    if problem is not None:
        raise CohortError([problem], manifest)
    return df


def _column_problems(cfg: CohortConfig, columns: list[str]) -> list[str]:
    wanted = [("image", cfg.image), ("outcome", cfg.outcome), ("patient", cfg.patient)]
    wanted += [("extra_outcomes", c) for c in cfg.extra_outcomes]
    if cfg.site:
        wanted.append(("site", cfg.site))
    wanted += [("clinical", c) for c in cfg.clinical] + [("baselines", c) for c in cfg.baselines]
    problems = []
    for key, col in wanted:
        if col not in columns:
            close = difflib.get_close_matches(col, columns, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"column {col!r} (cohort.{key}) is not in the manifest{guess}; "
                f"its columns are: {', '.join(columns)}"
            )
        elif key in ("clinical", "baselines") and col in _RESERVED:
            problems.append(
                f"column {col!r} (cohort.{key}) has a name the cohort table uses itself "
                f"({', '.join(_RESERVED)}); rename it in the manifest"
            )
    return problems


def load_cohort(cfg: CohortConfig) -> Cohort:
    """Read and check the manifest; every problem is reported together, before any training."""
    manifest = Path(cfg.manifest)
    df = _read_manifest(manifest)
    columns = set(df.columns)
    problems = _column_problems(cfg, list(df.columns))
    raw_path = df[cfg.image].str.strip() if cfg.image in columns else pd.Series("", index=df.index)

    def where(line: int) -> str:
        return f"row {line}: {raw_path[line]}" if raw_path[line] else f"row {line}"

    # Outcome first: rows dropped for an empty outcome are not checked any further.
    labels: dict[int, int] = {}
    dropped: list[int] = []
    if cfg.outcome in columns:
        pos = {v.strip().lower() for v in cfg.positive}
        neg = {v.strip().lower() for v in cfg.negative}
        problems += [
            f"outcome value {v!r} is listed in both `positive:` and `negative:`; keep it in one"
            for v in sorted(pos & neg)
        ]
        for line, value in df[cfg.outcome].items():
            v = value.strip().lower()
            if v in pos:
                labels[line] = 1
            elif v in neg:
                labels[line] = 0
            elif not v and cfg.drop_missing_outcome:
                dropped.append(line)
            elif not v:
                problems.append(
                    f"{where(line)}: the outcome (column {cfg.outcome!r}) is empty; fill it in, or "
                    "set `drop_missing_outcome: true` in the recipe's cohort section to drop such rows"
                )
            else:
                problems.append(
                    f"{where(line)}: outcome {value.strip()!r} is neither positive "
                    f"({', '.join(cfg.positive)}) nor negative ({', '.join(cfg.negative)}); "
                    "extend `positive:` or `negative:` in the recipe's cohort section"
                )
        df = df.drop(index=dropped)
        if df.empty:
            problems.append(f"all {len(dropped)} rows have an empty outcome (column {cfg.outcome!r})")

    base = Path(cfg.root) if cfg.root is not None else manifest.parent
    paths: dict[int, str] = {}
    missing = False
    if cfg.image in columns:
        for line in df.index:
            if not raw_path[line]:
                problems.append(f"row {line}: the image path (column {cfg.image!r}) is empty")
                continue
            paths[line] = os.path.abspath(base / Path(raw_path[line]).expanduser())
            if not os.path.isfile(paths[line]):
                missing = True
                problems.append(f"{where(line)}: image file not found (looked for {paths[line]})")
        by_path: dict[str, list[int]] = defaultdict(list)
        for line, p in paths.items():
            by_path[p].append(line)
        problems += [
            f"{_rows(lines)}: {p}: the same image is listed more than once; keep one row"
            for p, lines in by_path.items()
            if len(lines) > 1
        ]

    patient = df[cfg.patient].str.strip() if cfg.patient in columns else None
    if patient is not None:
        problems += [
            f"{where(ln)}: the patient id (column {cfg.patient!r}) is empty"
            for ln in df.index
            if not patient[ln]
        ]
        outcomes: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for line, pid in patient.items():
            if pid and line in labels:
                outcomes[pid][labels[line]].append(line)
        problems += [
            f"patient {pid!r} has conflicting outcomes: positive in {_rows(by_y[1])}, "
            f"negative in {_rows(by_y[0])}; one patient has one outcome"
            for pid, by_y in outcomes.items()
            if len(by_y) > 1
        ]

    site = df[cfg.site].str.strip() if cfg.site and cfg.site in columns else None
    if site is not None:
        problems += [
            f"{where(ln)}: the site (column {cfg.site!r}) is empty" for ln in df.index if not site[ln]
        ]
        if patient is not None:
            # A patient id shared by two sites is usually two patients with colliding ids, and
            # would leak between folds in leave-one-site-out.
            sites_of: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
            for line in df.index:
                if patient[line] and site[line]:
                    sites_of[patient[line]][site[line]].append(line)
            problems += [
                f"patient {pid!r} appears at several sites ("
                + "; ".join(f"{s!r} in {_rows(ls)}" for s, ls in by_site.items())
                + "); make patient ids unique across sites, e.g. prefix them with the site"
                for pid, by_site in sites_of.items()
                if len(by_site) > 1
            ]

    numeric: dict[str, list[float]] = {}
    for col in dict.fromkeys(cfg.clinical + cfg.baselines):
        if col not in columns or col in _RESERVED:
            continue
        numeric[col] = []
        for line, value in df[col].items():
            v = value.strip()
            try:
                numeric[col].append(float(v) if v else math.nan)
            except ValueError:
                problems.append(
                    f"{where(line)}: column {col!r}: {v!r} is not a number; "
                    "leave the cell empty for a missing value"
                )

    extra: dict[str, list[float]] = {}
    pos = {v.strip().lower() for v in cfg.positive}
    neg = {v.strip().lower() for v in cfg.negative}
    for col in cfg.extra_outcomes:
        if col not in columns:
            continue
        extra[col] = []
        for line, value in df[col].items():
            v = value.strip().lower()
            extra[col].append(1.0 if v in pos else 0.0 if v in neg else math.nan)
            if v and v not in pos and v not in neg:
                problems.append(f"{where(line)}: outcome {col!r} value {value.strip()!r} is neither positive nor negative")
        if patient is not None:
            seen: dict[str, dict[float, list[int]]] = defaultdict(lambda: defaultdict(list))
            for line, value in zip(df.index, extra[col]):
                if patient[line] and not math.isnan(value):
                    seen[patient[line]][value].append(line)
            problems += [
                f"patient {pid!r} has conflicting {col!r} outcomes: positive in {_rows(by[1.0])}, negative in {_rows(by[0.0])}"
                for pid, by in seen.items() if len(by) > 1
            ]

    classes = set(labels.values())
    if cfg.outcome in columns and len(labels) == len(df) and len(classes) == 1:
        kind = "positive" if classes == {1} else "negative"
        problems.append(
            f"all {len(df)} rows have a {kind} outcome (column {cfg.outcome!r}); a classifier "
            "needs both classes: check the outcome column and the recipe's "
            "`positive:`/`negative:` values"
        )

    if problems:
        hint = _HINT
        if missing:
            hint += (
                f" Relative image paths are read from {base}; "
                "set `root:` in the recipe's cohort section to change that."
            )
        raise CohortError(problems, manifest, hint=hint)

    table = pd.DataFrame(
        {
            "row": df.index.to_numpy(dtype=np.int64),
            "path": [paths[line] for line in df.index],
            "y": np.array([labels[line] for line in df.index], dtype=np.int64),
            "patient": patient.to_numpy(dtype=object),
        }
    )
    if site is not None:
        table["site"] = site.to_numpy(dtype=object)
    for col, values in numeric.items():
        table[col] = np.array(values, dtype=np.float64)
    for col, values in extra.items():
        table[f"y:{col}"] = np.array(values, dtype=np.float64)
    notes = [
        f"{where(ln)}: the outcome (column {cfg.outcome!r}) is empty; row dropped" for ln in dropped
    ]
    return Cohort(table=table, config=cfg, dropped=notes)
