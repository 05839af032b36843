"""The row-by-row checks of a cohort manifest, one step per method, for `cohort.load_cohort`.

The loader reports every problem at once, in one fixed order (outcomes, image paths, patients,
sites, numeric columns, extra outcomes, both classes, decoded images): each step appends its
messages to the one shared `problems` list, so the steps must run in that order. A step that
drops rows (an empty outcome) changes what the later ones see, which is why they share state
in one object instead of passing a dozen values along.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from stagewise.data.manifest_csv import RESERVED_COLUMNS
from stagewise.data.problems import MANIFEST_HINT, CohortError, file_key
from stagewise.data.subgroups import read_levels, subgroup_problems
from stagewise.recipe import CohortConfig


def rows_text(lines: list[int]) -> str:
    """'row 3' or 'rows 3, 7': how a message names the CSV lines concerned."""
    return f"row{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}"


class CohortRows:
    """The manifest's rows under check: what each step found, and the problems so far."""

    def __init__(self, cfg: CohortConfig, manifest: Path, df: pd.DataFrame, problems: list[str]):
        self.cfg = cfg
        self.manifest = manifest
        self.df = df
        self.rows_read = len(df)
        self.columns = set(df.columns)
        self.problems = problems
        self.raw_path = df[cfg.image].str.strip() if cfg.image in self.columns else pd.Series("", index=df.index)
        self.labels: dict[int, int] = {}
        self.dropped: list[int] = []
        self.patient: pd.Series | None = None
        self.site: pd.Series | None = None
        self.base = Path(cfg.root) if cfg.root is not None else manifest.parent
        self.paths: dict[int, str] = {}
        self.missing = False
        self.numeric: dict[str, list[float]] = {}
        self.extra: dict[str, list[float]] = {}
        self.levels: dict[str, list[str]] = {}
        self.image_warnings: list[str] = []
        self.image_problems = False
        self.shared_patients = False

    def where(self, line: int) -> str:
        """A row as messages name it: its line, and its image path where it has one."""
        return f"row {line}: {self.raw_path[line]}" if self.raw_path[line] else f"row {line}"

    def check_outcomes(self) -> None:
        """Outcome first: rows dropped for an empty outcome are not checked any further."""
        cfg, df, problems, labels, dropped = self.cfg, self.df, self.problems, self.labels, self.dropped
        if cfg.outcome not in self.columns:
            return
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
                    f"{self.where(line)}: the outcome (column {cfg.outcome!r}) is empty; fill it in, or "
                    "set `drop_missing_outcome: true` in the recipe's cohort section to drop such rows"
                )
            else:
                problems.append(
                    f"{self.where(line)}: outcome {value.strip()!r} is neither positive "
                    f"({', '.join(cfg.positive)}) nor negative ({', '.join(cfg.negative)}); "
                    "extend `positive:` or `negative:` in the recipe's cohort section"
                )
        self.df = df = df.drop(index=dropped)
        if df.empty:
            problems.append(f"all {len(dropped)} rows have an empty outcome (column {cfg.outcome!r})")

    def read_ids(self) -> None:
        """Patient and site ids of the rows kept, stripped (None where the column is absent)."""
        cfg, df = self.cfg, self.df
        self.patient = df[cfg.patient].str.strip() if cfg.patient in self.columns else None
        self.site = df[cfg.site].str.strip() if cfg.site and cfg.site in self.columns else None

    def check_image_paths(self) -> None:
        """Each row's image file exists; one file is not listed twice (links included)."""
        cfg, problems, paths, raw_path = self.cfg, self.problems, self.paths, self.raw_path
        if cfg.image not in self.columns:
            return
        for line in self.df.index:
            if not raw_path[line]:
                problems.append(f"row {line}: the image path (column {cfg.image!r}) is empty")
                continue
            paths[line] = os.path.abspath(self.base / Path(raw_path[line]).expanduser())
            if not os.path.isfile(paths[line]):
                self.missing = True
                problems.append(f"{self.where(line)}: image file not found (looked for {paths[line]})")
        self._check_duplicate_files()

    def _check_duplicate_files(self) -> None:
        """One file under several rows, also through a symbolic or hard link (same inode)."""
        paths, raw_path, patient = self.paths, self.raw_path, self.patient
        by_file: dict[tuple, list[int]] = defaultdict(list)
        for line, p in paths.items():
            by_file[file_key(p)].append(line)
        for lines in by_file.values():
            if len(lines) < 2:
                continue
            shown = list(dict.fromkeys(paths[ln] for ln in lines))
            if len(shown) == 1:
                msg = f"{rows_text(lines)}: {shown[0]}: the same image is listed more than once"
            else:
                names = ", ".join(dict.fromkeys(raw_path[ln] for ln in lines))
                msg = (
                    f"{rows_text(lines)}: {names} are one and the same file "
                    f"({os.path.realpath(paths[lines[0]])}, reached through a link)"
                )
            pids = list(dict.fromkeys(patient[ln] for ln in lines if patient[ln])) if patient is not None else []
            if len(pids) > 1:
                msg += (
                    f" under different patients ({', '.join(map(repr, pids))}), which leaks one image "
                    "between training and test folds"
                )
            self.problems.append(msg + "; keep one row")

    def check_patients(self) -> None:
        """Every row names its patient, and one patient has one outcome."""
        cfg, patient = self.cfg, self.patient
        if patient is None:
            return
        self.problems += [
            f"{self.where(ln)}: the patient id (column {cfg.patient!r}) is empty"
            for ln in self.df.index
            if not patient[ln]
        ]
        outcomes: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for line, pid in patient.items():
            if pid and line in self.labels:
                outcomes[pid][self.labels[line]].append(line)
        self.problems += [
            f"patient {pid!r} has conflicting outcomes: positive in {rows_text(by_y[1])}, "
            f"negative in {rows_text(by_y[0])}; one patient has one outcome"
            for pid, by_y in outcomes.items()
            if len(by_y) > 1
        ]

    def check_sites(self, whole_patients: bool = True) -> None:
        """Every row names its site, and (`whole_patients`, a study's sites) a patient id
        belongs to one site."""
        cfg, df, patient, site = self.cfg, self.df, self.patient, self.site
        if site is None:
            return
        self.problems += [
            f"{self.where(ln)}: the site (column {cfg.site!r}) is empty" for ln in df.index if not site[ln]
        ]
        if patient is not None and whole_patients:
            # A patient id shared by two sites is usually two patients with colliding ids, and
            # would leak between folds in leave-one-site-out.
            sites_of: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
            for line in df.index:
                if patient[line] and site[line]:
                    sites_of[patient[line]][site[line]].append(line)
            self.shared_patients = any(len(by_site) > 1 for by_site in sites_of.values())
            self.problems += [
                f"patient {pid!r} appears at several sites ("
                + "; ".join(f"{s!r} in {rows_text(ls)}" for s, ls in by_site.items())
                + "); make patient ids unique across sites, e.g. prefix them with the site"
                for pid, by_site in sites_of.items()
                if len(by_site) > 1
            ]

    def read_numeric(self) -> None:
        """Clinical and baseline columns as floats (empty = NaN); a non-number is a problem."""
        cfg, numeric = self.cfg, self.numeric
        for col in dict.fromkeys(cfg.clinical + cfg.baselines):
            if col not in self.columns or col in RESERVED_COLUMNS:
                continue
            numeric[col] = []
            for line, value in self.df[col].items():
                v = value.strip()
                try:
                    numeric[col].append(float(v) if v else math.nan)
                except ValueError:
                    decimal_comma = (
                        "; write decimals with a point (1.5, not 1,5)"
                        if re.fullmatch(r"[+-]?\d*,\d+", v)
                        else ""
                    )
                    self.problems.append(
                        f"{self.where(line)}: column {col!r}: {v!r} is not a number; "
                        f"leave the cell empty for a missing value{decimal_comma}"
                    )

    def read_subgroups(self) -> None:
        """Each subgroup column's level per row kept (`data.subgroups`); a non-number in a
        column cut into bands, too many levels, or the patient or image column is a problem."""
        self.problems += subgroup_problems(self.cfg)
        for spec in self.cfg.subgroups:
            if spec.column in self.columns:
                self.levels[spec.column], bad = read_levels(self.df, spec, self.where)
                self.problems += bad

    def read_extra_outcomes(self) -> None:
        """Secondary outcomes as 1/0/NaN (missing allowed), consistent within a patient."""
        cfg, df, patient, extra = self.cfg, self.df, self.patient, self.extra
        pos = {v.strip().lower() for v in cfg.positive}
        neg = {v.strip().lower() for v in cfg.negative}
        for col in cfg.extra_outcomes:
            if col not in self.columns:
                continue
            extra[col] = []
            for line, value in df[col].items():
                v = value.strip().lower()
                extra[col].append(1.0 if v in pos else 0.0 if v in neg else math.nan)
                if v and v not in pos and v not in neg:
                    self.problems.append(f"{self.where(line)}: outcome {col!r} value {value.strip()!r} is neither positive nor negative")
            if patient is not None:
                seen: dict[str, dict[float, list[int]]] = defaultdict(lambda: defaultdict(list))
                for line, value in zip(df.index, extra[col]):
                    if patient[line] and not math.isnan(value):
                        seen[patient[line]][value].append(line)
                self.problems += [
                    f"patient {pid!r} has conflicting {col!r} outcomes: positive in {rows_text(by[1.0])}, negative in {rows_text(by[0.0])}"
                    for pid, by in seen.items() if len(by) > 1
                ]

    def check_both_classes(self) -> None:
        """A classifier needs positives and negatives: one class only is a problem."""
        cfg, df = self.cfg, self.df
        classes = set(self.labels.values())
        if cfg.outcome in self.columns and len(self.labels) == len(df) and len(classes) == 1:
            kind = "positive" if classes == {1} else "negative"
            self.problems.append(
                f"all {len(df)} rows have a {kind} outcome (column {cfg.outcome!r}); a classifier "
                "needs both classes: check the outcome column and the recipe's "
                "`positive:`/`negative:` values"
            )

    def check_images(self, workers: int | None) -> None:
        """Decode every image found (load_cohort(decode=True)): bad files join the problems."""
        from stagewise.data.image_checks import inspect_images

        df, paths, raw_path, patient = self.df, self.paths, self.raw_path, self.patient
        found_lines = [ln for ln in df.index if ln in paths and os.path.isfile(paths[ln])]
        bad, self.image_warnings = inspect_images(
            [paths[ln] for ln in found_lines],
            found_lines,
            names=[raw_path[ln] for ln in found_lines],
            patients=[patient[ln] for ln in found_lines] if patient is not None else None,
            workers=workers,
        )
        self.problems += bad
        self.image_problems = bool(bad)

    def raise_problems(self) -> None:
        """One CohortError with every problem, its hint naming what to fix where."""
        if not self.problems:
            return
        hint = MANIFEST_HINT
        if self.image_problems:
            hint += " Replace unreadable or empty image files, or remove their rows."
        if self.shared_patients:
            hint += (f" A site holds whole patients; if column {self.cfg.site!r} rather groups one patient's images "
                     "(a view, a scanner), name it in the cohort's `subgroups:` instead of `site:`.")
        if self.missing:
            hint += (
                f" Relative image paths are read from {self.base}; "
                "set `root:` in the recipe's cohort section to change that."
            )
        raise CohortError(self.problems, self.manifest, hint=hint)

    def table(self) -> pd.DataFrame:
        """The checked cohort table (see `Cohort`), in manifest row order."""
        df = self.df
        table = pd.DataFrame(
            {
                "row": df.index.to_numpy(dtype=np.int64),
                "path": [self.paths[line] for line in df.index],
                "y": np.array([self.labels[line] for line in df.index], dtype=np.int64),
                "patient": self.patient.to_numpy(dtype=object),
            }
        )
        if self.site is not None:
            table["site"] = self.site.to_numpy(dtype=object)
        for col, values in self.numeric.items():
            table[col] = np.array(values, dtype=np.float64)
        for col, values in self.extra.items():
            table[f"y:{col}"] = np.array(values, dtype=np.float64)
        return table

    def groups(self) -> pd.DataFrame:
        """The subgroup levels (one column per subgroup, text), row for row with `table()`."""
        return pd.DataFrame({"row": self.df.index.to_numpy(dtype=np.int64),
                             **{c: np.array(v, dtype=object) for c, v in self.levels.items()}})

    def flow(self) -> dict:
        """Participant flow of the manifest: rows read, rows dropped (and why), rows kept."""
        return {"rows_read": self.rows_read, "dropped_missing_outcome": len(self.dropped), "images": len(self.df)}

    def dropped_notes(self) -> list[str]:
        """One run-log line per row dropped for an empty outcome."""
        return [
            f"{self.where(ln)}: the outcome (column {self.cfg.outcome!r}) is empty; row dropped" for ln in self.dropped
        ]
