"""Reading what a finished run wrote, for the report: metrics.json, environment.json,
recipe.yaml, log.txt and the saliency PNGs under folds/.

Kept apart from the sections (`sections`) so that every file access of the report sits in one
place, and each section only formats values it is handed.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import yaml

from stagewise.recipe import shareable_recipe
from stagewise.report.figures import png_data_uri


def read_json(path: Path) -> dict:
    """The file's JSON object, or {} when it is missing or unreadable (a report still renders)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_run(run_dir: Path) -> tuple[dict, dict, dict, str]:
    """(metrics, environment, recipe, recipe text) of a finished run.

    The recipe is the shareable one (no local paths), and its text is re-written from it when
    it parses, because the report leaves the site. A run without metrics.json has no report."""
    metrics = read_json(run_dir / "metrics.json")
    if not metrics:
        raise FileNotFoundError(f"{run_dir}: no readable metrics.json; run the study to the end first")
    env = read_json(run_dir / "environment.json")
    recipe_path = run_dir / "recipe.yaml"
    recipe_text = recipe_path.read_text() if recipe_path.is_file() else ""
    try:
        recipe = yaml.safe_load(recipe_text) or {}
    except yaml.YAMLError:
        recipe = {}
    recipe = shareable_recipe(recipe) if isinstance(recipe, dict) else {}
    if recipe:  # the report is shared: it shows the recipe without local paths
        recipe_text = yaml.safe_dump(recipe, sort_keys=False)
    return metrics, env, recipe, recipe_text


def run_date(run_dir: Path) -> str:
    """When the run started: the first timestamp of log.txt, else metrics.json's mtime."""
    try:
        with open(run_dir / "log.txt") as f:
            m = re.match(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2})", f.readline())
        if m:
            return m.group(1)
    except OSError:
        pass
    return datetime.fromtimestamp((run_dir / "metrics.json").stat().st_mtime).strftime("%Y-%m-%d %H:%M")


def split_name(file: str) -> str:
    """The split ('r0-f2') a saliency file belongs to: captions name the fold, never the file."""
    m = re.search(r"r(\d+)-f(\d+)", Path(file).name)
    return f"r{m.group(1)}-f{m.group(2)}" if m else Path(file).stem


def embed_png(run_dir: Path, rel: str) -> str | None:
    """A PNG inside the run folder as a data URI (the page is one file); None outside it or missing."""
    path = (run_dir / rel).resolve()
    if run_dir.resolve() not in path.parents or not path.is_file():
        return None
    return png_data_uri(path.read_bytes())
