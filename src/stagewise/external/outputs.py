"""The output folder of `stagewise evaluate`: what is local and what may be shared.

- `external.json` and `report.html` may leave the site: counts, settings, figures and curves
  only, no patient ids, image file names or paths (the bundle's recipe name and output name,
  and the site names of the manifest's site column, as a study's report shows them).
- `predictions-images.csv` and `predictions-patients.csv` stay at the site: they name the
  manifest rows, files and patients so that each figure can be traced to its images.
- `bundle-recalibrated/` (with --recalibrate): a bundle, as shareable as the one evaluated.

A folder holding files that no evaluation wrote there is refused (nothing overwritten), and
every file is written whole or not at all. An earlier evaluation is replaced only by one of
the same manifest (a rerun); one of another manifest that shares its file name (two
hospitals' `cohort.csv`) is refused under `-o`, and by default goes to a new folder
(`evaluations/cohort-2`), which the command names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from stagewise.errors import RunError
from stagewise.io import atomic_write, check_writable, strict_json

MARKER = ".stagewise-evaluation"
RESULTS = "external.json"
IMAGES_CSV = "predictions-images.csv"
PATIENTS_CSV = "predictions-patients.csv"
RECALIBRATED = "bundle-recalibrated"
OWN = (RESULTS, IMAGES_CSV, PATIENTS_CSV, "report.html", RECALIBRATED)


def default_folder(manifest: Path, base: Path = Path("evaluations")) -> Path:
    """`evaluations/<manifest name>`, or the first of `<name>-2`, `<name>-3`, ... that holds no
    evaluation of another manifest: an earlier evaluation is never replaced by one of a
    different cohort whose manifest has the same file name."""
    first = base / manifest.stem
    for k in range(1, 1000):
        folder = first if k == 1 else base / f"{manifest.stem}-{k}"
        if _evaluated(folder) in (None, _identity(manifest)):
            return folder
    raise RunError(f"{base} holds 999 evaluations of manifests named {manifest.name}; choose a folder with -o DIR")


def _identity(manifest: Path) -> str:
    return str(Path(manifest).resolve())


def _evaluated(out: Path) -> str | None:
    """The manifest an earlier evaluation in `out` evaluated ("unknown" when its marker does
    not say), or None when `out` holds none."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "unknown"
    return marker.get("manifest") or "unknown" if isinstance(marker, dict) else "unknown"


def prepare_folder(out: Path, manifest: Path | None = None) -> None:
    """Refuse a folder with files of these names that no evaluation wrote, or an earlier
    evaluation of another manifest than `manifest`; fail early when it cannot be written.
    Nothing is written but a probe file."""
    if out.is_dir() and not (out / MARKER).is_file():
        foreign = [n for n in OWN if (out / n).exists()]
        if foreign:
            raise RunError(f"{out} holds {', '.join(foreign)} that no `stagewise evaluate` wrote there; choose a new or "
                           "empty output folder (-o DIR)")
    earlier = _evaluated(out)
    if manifest is not None and earlier not in (None, _identity(manifest)):
        raise RunError(f"{out} holds an earlier evaluation of another manifest ({earlier}); nothing was replaced. "
                       "Choose a new output folder (-o DIR), or delete that folder to evaluate again there")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} is a file; give a folder for the evaluation's output (-o DIR)")
    check_writable(out)


def write_results(out: Path, results: dict, images: pd.DataFrame, patients: pd.DataFrame,
                  manifest: Path | None = None) -> None:
    """The local files and external.json; the marker (local only) names the manifest evaluated."""
    atomic_write(out / MARKER, json.dumps({"stagewise": results.get("stagewise"),
                                           "manifest": _identity(manifest) if manifest is not None else None}))
    atomic_write(out / IMAGES_CSV, images.to_csv(index=False))
    atomic_write(out / PATIENTS_CSV, patients.to_csv(index=False))
    atomic_write(out / RESULTS, strict_json(results))

