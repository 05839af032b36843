"""A hospital's side of a federated job (`job.FederatedJob`): its own cohort, folds and
images, its network between rounds on its own disk, and what it does for each message."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from stagewise.data import load_cohort
from stagewise.data.fingerprint import cohort_digest
from stagewise.evaluation.fold_scores import score_fold
from stagewise.evaluation.splits import make_splits
from stagewise.federated.job import FINAL, METRICS_SENT, FederatedJob, SiteConfig, fit_seed
from stagewise.federated.round_store import RoundStore
from stagewise.federated.site import SitePartition, SiteTrainer
from stagewise.io import atomic_save_tensors
from stagewise.recipe import load_recipe
from stagewise.training.cache import ImageSet, load_image_set
from stagewise.training.compute import resolve_compute


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
                    received: dict, mu: float = 0.0, from_start: tuple[list[str], str] | None = None):
        torch.set_num_threads(self.config.threads)
        trainer = self.trainer(fit)
        state = self.load_state(digest, fit, before=step)
        sent, new_state, n, loss, accounting = trainer.train_round(received, state, stage, round_in_stage, trainable, mu,
                                                                   from_start)
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
