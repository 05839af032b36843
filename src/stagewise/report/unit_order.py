"""The run's units as the report lists them: order, full-label or not, and their recipe arms.

Both the template context (context.py) and the reporting checklist (checklist.py) walk the units of
metrics.json in the same order and ask the same questions of them; these few rules live here so
that the two agree and neither module has to import the other.
"""

from __future__ import annotations

KIND_ORDER = {"model": 0, "clinical": 1, "baseline": 2}


def ordered_units(arms: dict) -> list[str]:
    """Unit names by kind (models, clinical, baselines, others), in metrics.json order within a kind."""
    names = list(arms)
    return sorted(names, key=lambda n: (KIND_ORDER.get(arms[n].get("kind"), 3), names.index(n)))


def is_full_label(unit: dict) -> bool:
    """True for a unit trained on all labels (every non-model unit, and models at label fraction 1)."""
    return unit.get("kind") != "model" or unit.get("label_fraction", 1.0) == 1.0


def recipe_arms(recipe: dict) -> dict[str, dict]:
    """The recipe's arms by name (empty when the run has no readable recipe.yaml)."""
    return {a.get("name"): a for a in recipe.get("arms") or [] if isinstance(a, dict)}
