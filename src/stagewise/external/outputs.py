"""The output folder of `stagewise evaluate`: what is local and what may be shared.

- `external.json` and `report.html` may leave the site: counts, settings, figures and curves
  only, no patient ids, image file names or paths (the bundle's recipe name and output name,
  and the site names of the manifest's site column, as a study's report shows them).
- `predictions-images.csv` and `predictions-patients.csv` stay at the site: they name the
  manifest rows, files and patients so that each figure can be traced to its images.
- `bundle-recalibrated/` (with --recalibrate): a bundle, as shareable as the one evaluated.

A folder holding files that no evaluation wrote there is refused (nothing overwritten), and
every file is written whole or not at all.
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


def prepare_folder(out: Path) -> None:
    """Refuse a folder with files of these names that no evaluation wrote; fail early when it
    cannot be written. Nothing is written but a probe file."""
    if out.is_dir() and not (out / MARKER).is_file():
        foreign = [n for n in OWN if (out / n).exists()]
        if foreign:
            raise RunError(f"{out} holds {', '.join(foreign)} that no `stagewise evaluate` wrote there; choose a new or "
                           "empty output folder (-o DIR)")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} is a file; give a folder for the evaluation's output (-o DIR)")
    check_writable(out)


def write_results(out: Path, results: dict, images: pd.DataFrame, patients: pd.DataFrame) -> None:
    atomic_write(out / MARKER, json.dumps({"stagewise": results.get("stagewise")}))
    atomic_write(out / IMAGES_CSV, images.to_csv(index=False))
    atomic_write(out / PATIENTS_CSV, patients.to_csv(index=False))
    atomic_write(out / RESULTS, strict_json(results))

