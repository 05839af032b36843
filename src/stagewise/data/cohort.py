"""Read and check a cohort manifest: one CSV row per image, with outcome and patient.

Every problem in the manifest is collected and reported in one error, each naming the
CSV line, so a user fixes the spreadsheet in one pass instead of one crash per typo.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from stagewise.data.problems import MANIFEST_HINT, CohortError, file_key
from stagewise.recipe import CohortConfig

# Table columns the loader owns; a clinical column with one of these names would be overwritten.
_RESERVED = ("row", "path", "y", "patient", "site")


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
        columns = list(dict.fromkeys([*self.config.clinical, *self.config.baselines]))
        if columns:
            out["missing"] = {c: {"rows": int(self.table[c].isna().sum()), "of_rows": int(len(self.table)),
                                  "patients": int(self.table.loc[self.table[c].isna(), "patient"].nunique())}
                              for c in columns if c in self.table}
        return out


def _rows(lines: list[int]) -> str:
    return f"row{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}"


# Separators tried when a comma-separated reading lacks the recipe's columns: Excel in
# many European locales saves "CSV" with ';', and tab-separated exports are common.
_OTHER_SEPARATORS = (";", "\t", "|")
_SEP_NAME = {",": "','", ";": "';'", "\t": "tabs", "|": "'|'"}


def _parse_manifest(manifest: Path, sep: str) -> tuple[pd.DataFrame | None, str | None]:
    try:
        # skip_blank_lines=False keeps the index aligned with line numbers; blank rows go below.
        df = pd.read_csv(
            manifest, sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig"
        )
    except UnicodeDecodeError:
        return None, "the manifest is not UTF-8 text; save it as 'CSV UTF-8'"
    except pd.errors.EmptyDataError:
        return None, "the manifest is empty; it needs a header line and one row per image"
    except (pd.errors.ParserError, OSError) as err:
        return None, f"the manifest cannot be read as CSV: {err}"
    df = df.fillna("")  # short rows give NaN in some pandas versions
    df.columns = [str(c).strip() for c in df.columns]
    return df, None


def _header_separator(manifest: Path) -> str | None:
    """';', tab or '|' when the header line holds more of it than commas, else None."""
    try:
        with manifest.open(encoding="utf-8-sig", errors="replace") as f:
            header = f.readline()
    except OSError:
        return None
    counts = {sep: header.count(sep) for sep in _OTHER_SEPARATORS}
    best = max(counts, key=counts.get)
    return best if counts[best] > header.count(",") else None


def _read_manifest(manifest: Path, wanted: Iterable[str] = ()) -> tuple[pd.DataFrame, str]:
    """The manifest as strings, indexed by CSV line number (header = line 1), and its separator.

    Read as comma-separated; when that fails or misses some `wanted` columns and the header
    line is rather separated by ';', tabs or '|', that reading is used if it finds more of them.
    """
    if not manifest.is_file():
        raise CohortError(
            [f"manifest not found: {manifest}"],
            manifest,
            hint="Check `manifest:` in the recipe's cohort section (relative to the recipe file).",
        )
    wanted = set(wanted)

    def found(frame: pd.DataFrame | None) -> int:
        return -1 if frame is None else len(wanted & set(frame.columns))

    sep = ","
    df, problem = _parse_manifest(manifest, sep)
    if (problem is not None or found(df) < len(wanted)) and not _problem_is_fatal(problem):
        other = _header_separator(manifest)
        if other is not None:
            df2, problem2 = _parse_manifest(manifest, other)
            if problem2 is None and found(df2) > found(df):
                df, problem, sep = df2, None, other
    if problem is None:
        df.index = df.index + 2
        df = df[~(df == "").all(axis=1)]
        if df.empty:
            problem = "the manifest has no rows; it needs one row per image below the header"
    if problem is not None:
        raise CohortError([problem], manifest)
    return df, sep


def _problem_is_fatal(problem: str | None) -> bool:
    """Reading problems another separator cannot fix (encoding, empty file)."""
    return problem is not None and not problem.startswith("the manifest cannot be read as CSV")


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


def _wanted_columns(cfg: CohortConfig) -> list[str]:
    return [cfg.image, cfg.outcome, cfg.patient, *cfg.extra_outcomes, *([cfg.site] if cfg.site else []),
            *cfg.clinical, *cfg.baselines]


def load_cohort(cfg: CohortConfig, *, decode: bool = False, workers: int | None = None) -> Cohort:
    """Read and check the manifest; every problem is reported together, before any training.

    decode=True also decodes every image file (`check_images`, `workers` threads): files
    that cannot be read, tiny or constant images and one image under two patients are
    reported in the same CohortError as the manifest's problems; doubts that do not stop a
    run (nearly black images, ...) land in `Cohort.warnings`.
    """
    manifest = Path(cfg.manifest)
    df, sep = _read_manifest(manifest, _wanted_columns(cfg))
    columns = set(df.columns)
    problems = _column_problems(cfg, list(df.columns))
    other = _header_separator(manifest) if sep == "," else None
    if problems and other is not None and any(c not in columns for c in _wanted_columns(cfg)):
        problems.append(
            f"the manifest seems to be separated by {_SEP_NAME[other]}, not commas (its header line "
            f"holds more of them), but neither reading finds the columns above; save it as "
            "comma-separated CSV, or check the column names in the recipe's cohort section"
        )
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

    patient = df[cfg.patient].str.strip() if cfg.patient in columns else None
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
        # One file under several rows, also through a symbolic or hard link (same inode).
        by_file: dict[tuple, list[int]] = defaultdict(list)
        for line, p in paths.items():
            by_file[file_key(p)].append(line)
        for lines in by_file.values():
            if len(lines) < 2:
                continue
            shown = list(dict.fromkeys(paths[ln] for ln in lines))
            if len(shown) == 1:
                msg = f"{_rows(lines)}: {shown[0]}: the same image is listed more than once"
            else:
                names = ", ".join(dict.fromkeys(raw_path[ln] for ln in lines))
                msg = (
                    f"{_rows(lines)}: {names} are one and the same file "
                    f"({os.path.realpath(paths[lines[0]])}, reached through a link)"
                )
            pids = list(dict.fromkeys(patient[ln] for ln in lines if patient[ln])) if patient is not None else []
            if len(pids) > 1:
                msg += (
                    f" under different patients ({', '.join(map(repr, pids))}), which leaks one image "
                    "between training and test folds"
                )
            problems.append(msg + "; keep one row")

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
                decimal_comma = (
                    "; write decimals with a point (1.5, not 1,5)"
                    if re.fullmatch(r"[+-]?\d*,\d+", v)
                    else ""
                )
                problems.append(
                    f"{where(line)}: column {col!r}: {v!r} is not a number; "
                    f"leave the cell empty for a missing value{decimal_comma}"
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

    image_warnings: list[str] = []
    image_problems = False
    if decode and paths:
        from stagewise.data.checks import inspect_images

        found_lines = [ln for ln in df.index if ln in paths and os.path.isfile(paths[ln])]
        bad, image_warnings = inspect_images(
            [paths[ln] for ln in found_lines],
            found_lines,
            names=[raw_path[ln] for ln in found_lines],
            patients=[patient[ln] for ln in found_lines] if patient is not None else None,
            workers=workers,
        )
        problems += bad
        image_problems = bool(bad)

    if problems:
        hint = MANIFEST_HINT
        if image_problems:
            hint += " Replace unreadable or empty image files, or remove their rows."
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
    return Cohort(table=table, config=cfg, dropped=notes, warnings=image_warnings)
