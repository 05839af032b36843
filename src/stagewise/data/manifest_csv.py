"""Read a cohort manifest CSV into strings indexed by CSV line, and check its columns.

Kept apart from the row checks (`cohort_rows`) because reading is about the file (encoding,
separator, header) while the row checks are about its contents; both report problems in the
words the cohort loader (`cohort.load_cohort`) gathers into one CohortError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from stagewise.data.problems import CohortError
from stagewise.recipe import CohortConfig
from stagewise.text import did_you_mean

RESERVED_COLUMNS = ("row", "path", "y", "patient", "site")
"""Table columns the loader owns; a clinical column with one of these names would be overwritten."""

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


def header_separator(manifest: Path) -> str | None:
    """';', tab or '|' when the header line holds more of it than commas, else None."""
    try:
        with manifest.open(encoding="utf-8-sig", errors="replace") as f:
            header = f.readline()
    except OSError:
        return None
    counts = {sep: header.count(sep) for sep in _OTHER_SEPARATORS}
    best = max(counts, key=counts.get)
    return best if counts[best] > header.count(",") else None


def read_manifest(manifest: Path, wanted: Iterable[str] = ()) -> tuple[pd.DataFrame, str]:
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
        other = header_separator(manifest)
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


def column_problems(cfg: CohortConfig, columns: list[str]) -> list[str]:
    """The recipe's columns missing from the manifest (with a close match as a guess), and
    clinical or baseline columns whose names the cohort table uses itself."""
    wanted = [("image", cfg.image), ("outcome", cfg.outcome), ("patient", cfg.patient)]
    wanted += [("extra_outcomes", c) for c in cfg.extra_outcomes]
    if cfg.site:
        wanted.append(("site", cfg.site))
    wanted += [("clinical", c) for c in cfg.clinical] + [("baselines", c) for c in cfg.baselines]
    wanted += [("subgroups", s.column) for s in cfg.subgroups]
    problems = []
    for key, col in wanted:
        if col not in columns:
            guess = did_you_mean(col, columns)
            problems.append(
                f"column {col!r} (cohort.{key}) is not in the manifest{guess}; "
                f"its columns are: {', '.join(columns)}"
            )
        elif key in ("clinical", "baselines") and col in RESERVED_COLUMNS:
            problems.append(
                f"column {col!r} (cohort.{key}) has a name the cohort table uses itself "
                f"({', '.join(RESERVED_COLUMNS)}); rename it in the manifest"
            )
    return problems


def wanted_columns(cfg: CohortConfig) -> list[str]:
    """Every manifest column the recipe's cohort section names."""
    return [cfg.image, cfg.outcome, cfg.patient, *cfg.extra_outcomes, *([cfg.site] if cfg.site else []),
            *cfg.clinical, *cfg.baselines, *(s.column for s in cfg.subgroups)]


def separator_note(cfg: CohortConfig, manifest: Path, sep: str, columns: set[str], problems: list[str]) -> list[str]:
    """A line to add when columns are missing from a comma-separated reading whose header looks
    separated otherwise: the likeliest cause is then the separator, not the column names."""
    other = header_separator(manifest) if sep == "," else None
    if problems and other is not None and any(c not in columns for c in wanted_columns(cfg)):
        return [
            f"the manifest seems to be separated by {_SEP_NAME[other]}, not commas (its header line "
            f"holds more of them), but neither reading finds the columns above; save it as "
            "comma-separated CSV, or check the column names in the recipe's cohort section"
        ]
    return []
