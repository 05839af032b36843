"""A federated job across hospitals that hold their own data: what is run and what each party
agrees to (each site's side of it is `site_work.SiteWork`).

In a study on one machine (`sites.mode: federated`) the folds are made over the pooled cohort.
In a deployment no machine sees the pooled cohort, so each hospital makes its own
patient-grouped, outcome-stratified folds of its own rows (the recipe's protocol and seed),
and fold k of the job is fold k at every site at once: the sites train together on their
fold-k training patients and each scores its own fold-k test patients. A final fit on every
row gives the model to deploy. The same job runs in Flower's simulation engine (to rehearse
it, and for the test that simulation and deployment agree) and over the network.

What a site keeps: its images, labels, folds, predictions, and its network between rounds
(frozen groups, FedBN statistics) on its own disk, so that a site or coordinator restart
continues where it stopped. What it sends: the trainable groups' tensors, the number of
training images, the mean loss, and at the end of a fold its scalar metrics.

This module imports no torch: the coordinator's and a hospital's command line read a job
here (its folds, its digest) before any process that trains starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stagewise.errors import StagewiseError
from stagewise.evaluation.splits import fold_seed, Split
from stagewise.recipe import ArmConfig, Recipe, RecipeError, recipe_to_dict, shareable_recipe

if TYPE_CHECKING:
    from stagewise.models import Network


class FederatedError(StagewiseError, RuntimeError):
    """A federated fit that could not complete (too few sites replied, a bad strategy)."""


FINAL = "final"
"""The fit on every row of every site: the model to deploy."""
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
METRICS_SENT = ("auroc", "balanced_accuracy", "f1", "brier", "threshold", "train_auroc", "n_test_patients",
                "n_train_patients", "sensitivity", "specificity", "ppv", "npv", "accuracy", "auprc")
"""The scalar metrics a site reports for a fold (those its metrics have): nothing per patient."""


def job_problems(recipe: Recipe, arm: ArmConfig) -> list[str]:
    """Why `arm` of `recipe` cannot run as a deployed federated job, if it cannot."""
    problems = []
    if arm.sites.mode != "federated":
        problems.append(f"arm '{arm.name}' has sites.mode {arm.sites.mode}; a deployment runs a federated arm")
    if recipe.protocol.kind != "group_kfold":
        problems.append("protocol.kind leave_one_site_out is for studies on one machine; a deployment folds each "
                        "site's own patients (group_kfold)")
    if recipe.protocol.label_fractions:
        problems.append("protocol.label_fractions are not run in a deployment")
    if arm.sites.cross_site_evaluation:
        problems.append(f"arm '{arm.name}' sets sites.cross_site_evaluation, which a deployment does not run yet (a "
                        "study's simulation does); remove it for the deployed job, so no site model leaves its site")
    if any(s.external for s in arm.stages):
        problems.append(f"arm '{arm.name}' pretrains on a source manifest; run that once, save the backbone and name "
                        "it as `file:` in the recipe every site holds")
    return problems


@dataclass
class FederatedJob:
    """What the coordinator runs and every site checks that it agrees to (`digest`)."""

    recipe: Recipe
    arm: ArmConfig
    cv: bool = True
    """Cross-validate: the protocol's folds, each site folding its own patients."""
    final: bool = True
    """Train on every row of every site at the end (the model to deploy)."""

    @classmethod
    def of(cls, recipe: Recipe, arm: str, cv: bool = True, final: bool = True) -> "FederatedJob":
        arms = {a.name: a for a in recipe.arms}
        if arm not in arms:
            raise RecipeError(f"the recipe has no arm '{arm}'; its arms are {', '.join(arms)}")
        if not (cv or final):
            raise RecipeError("a job cross-validates, trains the final model, or both")
        job = cls(recipe, arms[arm], cv, final)
        if problems := job_problems(recipe, arms[arm]):
            raise RecipeError("; ".join(problems))
        return job

    def fits(self) -> list[str]:
        p = self.recipe.protocol
        names = [f"r{r}-f{f}" for r in range(p.repeats) for f in range(p.folds)] if self.cv else []
        return names + ([FINAL] if self.final else [])

    @property
    def n_outputs(self) -> int:
        return 1 + len(self.recipe.cohort.extra_outcomes)

    def digest(self) -> str:
        """What every party must agree on: the arm, the data settings, the protocol, the seed
        and the outcome columns (no manifest, no path: each site has its own)."""
        data = shareable_recipe(recipe_to_dict(self.recipe))
        cohort = data["cohort"]
        agreed = {
            "arm": next(a for a in data["arms"] if a["name"] == self.arm.name), "data": data["data"],
            "protocol": data["protocol"], "seed": data["seed"],
            "cohort": {k: cohort[k] for k in ("outcome", "extra_outcomes", "positive", "negative")},
        }
        return hashlib.sha256(json.dumps(agreed, sort_keys=True).encode()).hexdigest()[:16]

    def start(self, fit: str) -> "Network":
        """The network every site and the server start fit `fit` from."""
        from stagewise.training.start import seeded_backbone, start_network  # torch: not for the CLI's job file

        pristine = seeded_backbone(self.arm, self.recipe.seed)
        return start_network(self.arm, pristine, self.n_outputs, fit_seed(self.recipe.seed, fit))


def fit_seed(seed: int, fit: str) -> int:
    """The fold seed of a study for `r<i>-f<j>`; a seed of its own for the final fit."""
    if fit == FINAL:
        return fold_seed(seed, Split(-1, -1, np.zeros(0), np.zeros(0)))
    r, f = (int(x) for x in re.fullmatch(r"r(\d+)-f(\d+)", fit).groups())
    return fold_seed(seed, Split(r, f, np.zeros(0), np.zeros(0)))


@dataclass
class SiteConfig:
    """One hospital's settings, read from the site file the `site` command writes (a local
    file named in the SuperNode's node config, which Flower never sends to the server)."""

    recipe: Path
    site: str
    workdir: Path
    threads: int = 1
    linkage_key: Path | None = None
    """The hospitals' shared linkage key (federated/linkage.py), if they agreed on one."""

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps({"recipe": str(self.recipe), "site": self.site, "workdir": str(self.workdir),
                                    "threads": self.threads,
                                    "linkage_key": str(self.linkage_key) if self.linkage_key else None}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SiteConfig":
        d = json.loads(Path(path).read_text())
        key = d.get("linkage_key")
        return cls(Path(d["recipe"]), d["site"], Path(d["workdir"]), int(d.get("threads", 1)), Path(key) if key else None)
