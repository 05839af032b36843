"""The external cohort: its manifest read and checked exactly as `stagewise run` reads one
(data.load_cohort: every problem at once, by CSV line; every image decoded), then scored by
the bundle on the images as the bundle's preprocessing prepares them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from stagewise.data import Cohort, CohortError, load_cohort, load_images
from stagewise.evaluation.metrics import patient_scores
from stagewise.external.options import ExternalOptions
from stagewise.recipe import CohortConfig, SubgroupConfig

_BATCH = 32


def bundle_recipe(bundle_path: Path) -> dict:
    """The bundle's (shareable) recipe as a dict; {} for a bundle without one."""
    try:
        data = yaml.safe_load((bundle_path / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _header(manifest: Path) -> list[str]:
    try:
        return [str(c).strip() for c in pd.read_csv(manifest, nrows=0, sep=None, engine="python",
                                                     encoding="utf-8-sig").columns]
    except Exception:  # noqa: BLE001 - load_cohort reports an unreadable manifest properly
        return []


def cohort_config(manifest: Path, options: ExternalOptions, recipe: dict, outcome: str) -> CohortConfig:
    """The manifest's columns and outcome coding: the options where given, else the bundle
    recipe's (its outcome named `outcome`); its site column, baseline columns and subgroup
    columns (`--subgroup`, else the recipe's) only where the manifest has them."""
    dev = recipe.get("cohort") or {}
    header = _header(manifest)
    site = options.site
    if site is None and dev.get("site") and dev["site"] in header:
        site = dev["site"]
    subgroups = options.subgroup_configs() or [SubgroupConfig.model_validate(g) for g in dev.get("subgroups") or []
                                               if isinstance(g, dict) and g.get("column") in header]
    values = {
        "manifest": manifest,
        "image": options.image or dev.get("image") or "path",
        "outcome": options.outcome or outcome,
        "patient": options.patient or dev.get("patient") or "patient",
        "site": site,
        "root": options.root,
        "drop_missing_outcome": options.drop_missing_outcome,
        "baselines": [c for c in dev.get("baselines") or [] if c in header],
        "subgroups": subgroups,
    }
    if options.positive or dev.get("positive"):
        values["positive"] = options.positive or dev["positive"]
    if options.negative or dev.get("negative"):
        values["negative"] = options.negative or dev["negative"]
    return CohortConfig(**values)


# load_cohort words its advice for a recipe; here the same fixes are command-line options.
_AS_OPTIONS = (
    ("extend `positive:` or `negative:` in the recipe's cohort section", "map such values with --positive / --negative"),
    ("set `drop_missing_outcome: true` in the recipe's cohort section to drop such rows",
     "pass --drop-missing-outcome to leave such rows out"),
    ("the recipe's `positive:`/`negative:` values", "the --positive / --negative values"),
    ("set `root:` in the recipe's cohort section to change that", "pass --root DIR to change that"),
    ("(cohort.image)", "(--image)"), ("(cohort.outcome)", "(--outcome)"), ("(cohort.patient)", "(--patient)"),
    ("(cohort.site)", "(--site)"),
    ("or in the recipe's cohort section", "or with the options of `stagewise evaluate` (--image, --outcome, --patient, "
                                          "--site, --positive, --negative)"),
    ("the column names in the recipe's cohort section", "the column options (--image, --outcome, --patient)"),
)


def _as_options(text: str) -> str:
    for old, new in _AS_OPTIONS:
        text = text.replace(old, new)
    return text


def load_external(manifest: Path, options: ExternalOptions, recipe: dict, outcome: str) -> Cohort:
    """The checked cohort (CohortError listing every row and file problem at once, its
    advice in terms of the command's options)."""
    try:
        # an external "site" column only groups figures (e.g. by view): one patient may lie at several
        return load_cohort(cohort_config(manifest, options, recipe, outcome), decode=True, sites_hold_patients=False)
    except CohortError as err:
        raise CohortError([_as_options(p) for p in err.problems], err.manifest, hint=_as_options(err.hint)) from None


def score_cohort(bundle, cohort: Cohort, engine: str = "torch") -> np.ndarray:
    """(images, outputs) probabilities, the images prepared as the bundle prepares a file
    (`Bundle.read`: the reader, the bundle's resizing, float16)."""
    t = cohort.table
    x = load_images(t["path"].tolist(), bundle.info["image_size"], bundle.info["resize"], rows=t["row"].tolist())
    if x.dim() - 2 != bundle.spatial_dims:
        kind = {2: "2D images", 3: "3D volumes"}
        raise CohortError([f"the manifest lists {kind[x.dim() - 2]}; this bundle scores {kind[bundle.spatial_dims]}"],
                          cohort.config.manifest, hint="Evaluate the bundle on a cohort of the kind it was trained on.")
    out = [bundle.probabilities(x[i : i + _BATCH].float(), engine) for i in range(0, len(x), _BATCH)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, len(bundle.info["tasks"])))


def patient_table(cohort: Cohort, prob: np.ndarray, test_images: str, aggregate: str) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per patient (manifest order): patient, y, score (the aggregate of the images
    used), [site]; and which images were used (test_images first: each patient's first)."""
    t = cohort.table
    used = np.ones(len(t), dtype=bool)
    if test_images == "first":
        used = ~t["patient"].duplicated().to_numpy()
    part = t[used]
    score, y = patient_scores(prob[used], part["y"].to_numpy(), part["patient"].to_numpy(), aggregate)
    table = pd.DataFrame({"patient": part["patient"].drop_duplicates().to_numpy(), "y": y.astype(int), "score": score})
    if "site" in t and not part.groupby("patient", sort=False)["site"].nunique().gt(1).any():
        table["site"] = part.groupby("patient", sort=False)["site"].first().to_numpy()
    return table, used

