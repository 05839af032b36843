"""The units of a study: the result columns that every fold produces.

A *unit* is a model arm (possibly at a fraction of the training labels), a baseline score
column, or the clinical-only model. The study runner fits them; the checks and the report
need only their names.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.recipe import ArmConfig, Recipe


@dataclass(frozen=True)
class Unit:
    name: str
    kind: str
    """model | baseline | clinical"""
    arm: ArmConfig | None = None
    fraction: float = 1.0
    column: str | None = None

    @property
    def folder(self) -> str:
        return self.name.replace(":", "-")


def study_units(recipe: Recipe) -> list[Unit]:
    units = [Unit(a.name, "model", a) for a in recipe.arms]
    for f in sorted(set(recipe.protocol.label_fractions)):
        if f < 1.0:
            units += [Unit(f"{a.name}@{f:g}", "model", a, fraction=f) for a in recipe.arms]
    units += [Unit(f"baseline:{c}", "baseline", column=c) for c in recipe.cohort.baselines]
    if recipe.cohort.clinical and recipe.evaluation.clinical_model:
        units.append(Unit("clinical", "clinical"))
    return units
