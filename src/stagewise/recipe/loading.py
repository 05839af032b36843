"""A recipe in and out: validation of a dict (`recipe_from_dict`), YAML files (`load_recipe`),
`--set` overrides (`apply_overrides`), the dump (`recipe_to_dict`) and the copy that may leave
the site (`shareable_recipe`, `shareable_backbone`)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from pydantic import ValidationError
from stagewise.recipe.base import RecipeError, format_errors
from stagewise.recipe.stages import STAGE_KINDS
from stagewise.recipe.study import Recipe


def recipe_from_dict(data: dict, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe given as a dict; relative paths resolve against `base_dir`.

    Top-level keys starting with `x-` are ignored, so a recipe can hold YAML anchors
    (`x-stages: &thaw {...}`) that its arms refer to, as docker-compose files do.
    """
    data = {k: v for k, v in data.items() if not str(k).startswith("x-")}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_errors(err, source, STAGE_KINDS, Recipe, data)) from None
    if base_dir is not None:
        sources = [s.source for a in recipe.arms for s in a.stages if s.external]
        for c in [recipe.cohort, *sources]:
            if not c.manifest.is_absolute():
                c.manifest = (base_dir / c.manifest).resolve()
            if c.root is not None and not c.root.is_absolute():
                c.root = (base_dir / c.root).resolve()
        for arm in recipe.arms:
            b = arm.backbone
            for field in ("weights", "cache_dir"):
                value = getattr(b, field)
                if value is not None and not value.expanduser().is_absolute():
                    setattr(b, field, (base_dir / value).resolve())
            source, _, rest = b.name.partition(":")
            if source in ("file", "run") and rest and not Path(rest).expanduser().is_absolute():
                b.name = f"{source}:{(base_dir / rest).resolve()}"
    return recipe


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`protocol.repeats=1`, `arms.0.stages.1.epochs=5`: values parsed as YAML scalars."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise RecipeError(f"--set {item!r}: write FIELD=VALUE, e.g. protocol.repeats=1")
        node, parts = data, path.split(".")
        for i, part in enumerate(parts):
            key = int(part) if isinstance(node, list) and part.isdigit() else part
            where = ".".join(parts[:i]) or "the recipe"
            if isinstance(node, list) and isinstance(key, int) and not -len(node) <= key < len(node):
                raise RecipeError(f"--set {item!r}: index {key} out of range: {where} has {len(node)} "
                                  f"entr{'y' if len(node) == 1 else 'ies'} (0 to {len(node) - 1})")
            if isinstance(node, list) and not isinstance(key, int):
                raise RecipeError(f"--set {item!r}: {where} is a list; write an index (0 to {len(node) - 1}), not {part!r}")
            if not isinstance(node, (list, dict)):
                raise RecipeError(f"--set {item!r}: {where} is a value ({node!r}), it has no field {part!r}")
            if i == len(parts) - 1:
                node[key] = yaml.safe_load(raw)
            else:
                node = node[key] if isinstance(node, list) else node.setdefault(key, {})
    return data


def read_recipe_data(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A recipe file's YAML mapping with `overrides` applied, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with name, cohort and arms")
    return apply_overrides(data, overrides or [])


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe; paths inside it are relative to the recipe file.
    `overrides` (FIELD=VALUE, dotted) change fields before validation."""
    path = Path(path)
    data = read_recipe_data(path, overrides)
    return recipe_from_dict(data, source=str(path), base_dir=path.parent.resolve())


def recipe_to_dict(recipe: Recipe) -> dict:
    return recipe.model_dump(mode="json")


SITE_FILE = "(a file at the site)"
"""What a shared recipe says in place of a manifest's or a weights file's name: a file name
chosen at a site may name a patient (`Smith_John_MRN12345_cohort.csv`)."""


def _site_file(value) -> str | None:
    return None if value is None else SITE_FILE


def shareable_backbone(name: str) -> str:
    """A backbone spec without the names and folders of `file:`/`run:` paths (the arm a
    `run:` names is a recipe's, and stays)."""
    source, _, rest = name.partition(":")
    if source == "dual":
        return f"dual:{shareable_backbone(rest)}"
    if source not in ("file", "run"):
        return name
    arm = rest.partition("#")[2]
    return f"{source}:{SITE_FILE}" + (f"#{arm}" if arm else "")


def shareable_recipe(data: dict) -> dict:
    """A resolved recipe (as `recipe_to_dict` gives it) as it may leave the site, in a bundle
    or a report: manifests and weight files named only as `SITE_FILE`, roots and caches
    dropped, so that no local file or folder name (which may name a patient) is shared."""
    data = copy.deepcopy(data)
    if isinstance(data.get("tracking"), dict):  # a server address (or its credentials) stays at the site
        data["tracking"]["uri"] = None
    cohort = data.get("cohort") or {}
    if "manifest" in cohort:
        cohort["manifest"] = _site_file(cohort["manifest"])
    if cohort.get("root") is not None:
        cohort["root"] = None
    for arm in data.get("arms") or []:
        b = arm.get("backbone")
        if isinstance(b, str):
            arm["backbone"] = shareable_backbone(b)
        elif isinstance(b, dict):
            b["name"] = shareable_backbone(str(b.get("name", "")))
            b["weights"] = _site_file(b.get("weights"))
            b["cache_dir"] = None
        for stage in arm.get("stages") or []:
            if isinstance(stage, dict) and isinstance(stage.get("source"), dict):
                stage["source"]["manifest"] = _site_file(stage["source"].get("manifest"))
                stage["source"]["root"] = None
    return data
