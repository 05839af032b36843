"""A federated job across hospitals that hold their own data: what is run, and each site's side.

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
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stagewise.data import load_cohort
from stagewise.evaluation.splits import fold_seed, Split, make_splits
from stagewise.federated.site import SitePartition, SiteTrainer
from stagewise.models import Network
from stagewise.recipe import ArmConfig, Recipe, RecipeError, load_recipe, recipe_to_dict, shareable_recipe
from stagewise.data.fingerprint import cohort_digest
from stagewise.evaluation.fold_scores import score_fold
from stagewise.training.start import seeded_backbone, start_network
from stagewise.training.cache import load_image_set, ImageSet
from stagewise.training.compute import resolve_compute
from stagewise.federated.round_store import RoundStore
from stagewise.io import atomic_save_tensors

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

    def start(self, fit: str) -> Network:
        """The network every site and the server start fit `fit` from."""
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


class SiteWork:
    """A hospital's side of a job: its own cohort, folds and images, its state on its disk."""

    def __init__(self, config: SiteConfig, arm: str):
        self.config = config
        self.recipe = load_recipe(config.recipe)
        self.job = FederatedJob.of(self.recipe, arm)
        self.compute = resolve_compute(self.recipe.compute)
        self.cohort = load_cohort(self.recipe.cohort)  # every image was decoded and checked by prepare_site
        t = self.cohort.table
        self.y, self.patients = t["y"].to_numpy(), t["patient"].to_numpy()
        self.targets = torch.tensor(self.cohort.targets(), dtype=torch.float32)
        self.splits = {s.name: s for s in make_splits(self.y, self.patients, self.recipe.protocol, self.recipe.seed)}
        self._images = None
        self._trainer: tuple[str, SiteTrainer] | None = None

    def digest(self) -> str:
        return self.job.digest()

    @property
    def images(self) -> ImageSet:
        """The site's preprocessed images, kept on its disk between messages: a SuperNode runs
        each message in a fresh process, which would otherwise decode every image again."""
        if self._images is None:
            from safetensors.torch import load_file

            d = self.recipe.data
            key = hashlib.blake2b(f"{cohort_digest(self.cohort.table, list(self.cohort.table.columns))}:{d.image_size}:"
                                  f"{d.resize}".encode(), digest_size=12).hexdigest()
            path = self.config.workdir / "cache" / f"images-{key}.safetensors"
            if path.is_file():
                self._images = ImageSet(load_file(str(path))["x"], f"site:{key}")
            else:
                self._images = load_image_set(self.recipe, self.cohort)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_save_tensors(path, {"x": self._images.x})
        return self._images

    def rows(self, fit: str) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, test rows) of this site in fit `fit`."""
        if fit == FINAL:
            return np.arange(len(self.y)), np.zeros(0, dtype=int)
        if fit not in self.splits:
            raise ValueError(f"fit {fit!r} is not a fold of this site's protocol")
        return self.splits[fit].train, self.splits[fit].test

    def trainer(self, fit: str) -> SiteTrainer:
        """The site's trainer of fit `fit`, built once for the fit's messages (the fold's start
        network is the same every time; a trainer keeps no state between rounds): building it
        took a fifth of a deployed site's time when every message built it again."""
        if self._trainer is None or self._trainer[0] != fit:
            train, test = self.rows(fit)
            part = SitePartition(self.config.site, self.images, self.targets, train, np.concatenate([train, test]))
            self._trainer = (fit, SiteTrainer(part, self.job.arm, self.job.start(fit), self.compute,
                                              fit_seed(self.recipe.seed, fit)))
        return self._trainer[1]

    # -- the site's state between rounds, on its own disk ---------------------------------

    def state_store(self, digest: str, fit: str) -> RoundStore:
        """The site's network between rounds of fit `fit`, on its own disk (the last two rounds)."""
        return RoundStore(self.config.workdir / "state" / digest / fit, keep=2)

    def load_state(self, digest: str, fit: str, before: int | None = None) -> dict | None:
        """The site's network after its latest round (before step `before`), or None."""
        found = self.state_store(digest, fit).latest(before)
        return None if found is None else found[1]

    def save_state(self, digest: str, fit: str, step: int, state: dict) -> None:
        self.state_store(digest, fit).save(step, state)

    # -- what the site does for a message -------------------------------------------------

    def train_round(self, digest: str, fit: str, step: int, stage: int, round_in_stage: int, trainable: list[str],
                    received: dict, mu: float = 0.0):
        torch.set_num_threads(self.config.threads)
        trainer = self.trainer(fit)
        state = self.load_state(digest, fit, before=step)
        sent, new_state, n, loss, accounting = trainer.train_round(received, state, stage, round_in_stage, trainable, mu)
        self.save_state(digest, fit, step, new_state)
        return sent, n, loss, accounting

    def evaluate(self, digest: str, fit: str, received: dict) -> dict[str, float]:
        """This site's scalar metrics of fit `fit` (its final model on its own test patients);
        its per-image predictions stay in its workdir."""
        torch.set_num_threads(self.config.threads)
        train, test = self.rows(fit)
        if fit == FINAL:
            return {"n_train_patients": float(len(np.unique(self.patients[train]))), "n_train_images": float(len(train))}
        prob = self.trainer(fit).scores(received, self.load_state(digest, fit))
        split = self.splits[fit]
        metrics, preds = score_fold(self.recipe, self.cohort, split, train, prob[: len(train)], prob[len(train):])
        folder = self.config.workdir / "predictions" / digest
        folder.mkdir(parents=True, exist_ok=True)
        preds.to_csv(folder / f"{fit}.csv", index=False)  # stays at the site
        return {k: float(metrics[k]) for k in METRICS_SENT if isinstance(metrics.get(k), (int, float))
                and metrics[k] is not None}
