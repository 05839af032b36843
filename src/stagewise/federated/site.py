"""What one hospital does in a federated round: load the shared tensors it received into
its own copy of the network, train the round's groups on its own rows for the stage's
local epochs, and send back the shared tensors only.

A site's network between rounds (its frozen groups, and its BatchNorm under FedBN) never
leaves it: `SiteTrainer` rebuilds the network from the arm's starting weights and the
site's own saved state (Flower keeps that in the node's `context.state`).
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from stagewise.federated.job import FederatedError
from stagewise.federated.sharing import state_digest
from stagewise.models import Network
from stagewise.recipe import ArmConfig, Stage
from stagewise.training.cache import ImageSet
from stagewise.training.compute import Compute
from stagewise.training.dp_sgd import DpSgd
from stagewise.training.engine import fit_stage, predict, prepare_network
from stagewise.training.privacy_budget import site_noise
from stagewise.training.stages import stage_kind


@dataclass
class SitePartition:
    """What one site holds in a fold: its own images and labels, nothing of other sites."""

    site: str
    images: ImageSet
    """This site's images only (training rows first, then rows to score)."""
    targets: torch.Tensor
    train: np.ndarray
    """Indices into `images` of the site's training rows."""
    score: np.ndarray
    """Indices into `images` of the rows the site scores at the end (its training and test rows)."""


def site_seed(seed: int, site: str) -> int:
    """A site's seed in a fold: the fold seed and the site name, nothing else (run-order free)."""
    digest = hashlib.blake2b(f"{seed}:site:{site}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def round_seed(site_seed_: int, stage_index: int, round_in_stage: int) -> int:
    """Round 0 of a stage uses the seed a local run of that stage uses (see study.train_fold)."""
    return site_seed_ + 1000 * (stage_index + 1) + 100003 * round_in_stage


def round_stage(stage: Stage, trainable: list[str]) -> Stage:
    """The stage one round runs at a site: the stage's own settings for `stage.epochs` local
    epochs, training exactly the `trainable` groups (its kind decides: a thaw stage's
    unfreezing counts rounds, see `training/stages/thaw.py`)."""
    kind = stage_kind(stage)
    if kind.round_stage is not None:
        return kind.round_stage(stage, trainable)
    return type(stage).model_validate(stage.model_dump() | {"rounds": None})


def proximal_term(net: Network, reference: dict[str, torch.Tensor], mu: float):
    """FedProx's mu/2 * ||w - w_global||^2 over the shared parameters, or None for mu = 0."""
    if not mu:
        return None
    params = dict(net.named_parameters())
    pairs = [(params[k], v.to(params[k].device)) for k, v in reference.items() if k in params]

    def penalty() -> torch.Tensor:
        return 0.5 * mu * sum(((p - r) ** 2).sum() for p, r in pairs if p.requires_grad)

    return penalty


def privacy_metrics(record: dict | None) -> dict:
    """A round's DP-SGD record as Flower reply metrics (numbers only: what the accountant needs)."""
    if not record:
        return {}
    return {"dp-noise": record["noise_multiplier"], "dp-rate": record["sample_rate"], "dp-steps": record["steps"]}


class SiteTrainer:
    """One site's side of a federated fold."""

    def __init__(self, partition: SitePartition, arm: ArmConfig, start: Network, compute: Compute, seed: int):
        self.partition, self.arm, self.compute = partition, arm, compute
        self.start = start  # the arm's starting network (named weights + the fold's head init)
        self.seed = site_seed(seed, partition.site)
        self.stages = [s for s in arm.stages if not s.external]
        self._start_matches: str | None = None  # the coordinator's digest this site's start was checked against

    def network(self, local_state: dict[str, torch.Tensor] | None) -> Network:
        net = copy.deepcopy(self.start)
        if local_state:
            net.load_state_dict(local_state)
        return prepare_network(net, self.compute)

    def privacy(self) -> DpSgd | None:
        """The arm's DP-SGD at this site (`sites.privacy`), its noise chosen for the site's own
        number of training images when the recipe gives a target epsilon; None without."""
        cfg = self.arm.sites.privacy
        if cfg is None:
            return None
        return DpSgd(site_noise(cfg, self.stages, len(self.partition.train)), cfg.clip)

    def train_round(self, received: dict[str, torch.Tensor], local_state: dict | None, stage_index: int,
                    round_in_stage: int, trainable: list[str], mu: float = 0.0,
                    from_start: tuple[list[str], str] | None = None):
        """Train one round; returns (tensors to send, the site's new state, examples, mean loss,
        the round's DP-SGD accounting as reply metrics: empty without `sites.privacy`).
        `from_start` (`sharing.from_start_of` of the round's config): the coordinator's starting
        network's digest, which this site's must match, and the shared tensors the coordinator
        did not send because they are still the starting weights; they are taken from this
        site's own (`with_start`) and sent back trained like the others."""
        received = self.with_start(received, from_start)
        net = self.network(local_state)
        net.load_state_dict(received, strict=False)
        whole = self.stages[stage_index]
        stage = round_stage(whole, trainable)
        part = (round_in_stage, whole.rounds) if self.arm.sites.lr_schedule == "across_rounds" else (0, 1)
        log = fit_stage(net, stage, self.partition.images, self.partition.train, self.partition.targets,
                        self.compute, None, round_seed(self.seed, stage_index, round_in_stage),
                        penalty=proximal_term(net, received, mu), privacy=self.privacy(), schedule_part=part)
        state = OrderedDict((k, v.detach().cpu().clone()) for k, v in net.state_dict().items())
        sent = OrderedDict((k, state[k]) for k in received)
        return (sent, state, len(self.partition.train), float(np.mean([e["loss"] for e in log.epochs])),
                privacy_metrics(log.privacy))

    def with_start(self, received: dict[str, torch.Tensor],
                   from_start: tuple[list[str], str] | None) -> "OrderedDict[str, torch.Tensor]":
        """`received` with the tensors `from_start` names taken from this site's starting weights,
        in the network's state-dict order, once the digest of this site's whole
        starting network matches the coordinator's (checked once per digest)."""
        if not from_start:
            return received
        names, digest = from_start
        own = self.start.state_dict()
        if digest != self._start_matches:
            if state_digest(own) != digest:
                raise FederatedError(  # short: the coordinator's round error keeps 200 characters of it
                    f"site {self.partition.site}: its starting network differs from the coordinator's; use the same "
                    "pretrained weights file and stagewise and torch versions everywhere")
            self._start_matches = digest
        if not names:
            return received
        if unknown := [k for k in names if k not in own]:
            raise FederatedError(f"site {self.partition.site}: the coordinator names tensors its starting network "
                                 f"does not have ({len(unknown)}, e.g. {unknown[0]})")
        wanted = set(names) | set(received)
        return OrderedDict((k, received[k] if k in received else own[k].detach().cpu().clone())
                           for k in own if k in wanted)

    def final_network(self, received: dict[str, torch.Tensor], local_state: dict | None) -> Network:
        """The site's final model: the aggregated tensors over the site's own state, then
        personalised by the arm's `site_local` stages, trained here on the site's own training
        rows (nothing of them leaves the site)."""
        net = self.network(local_state)
        net.load_state_dict(received, strict=False)
        p = self.partition
        for i, stage in enumerate(self.stages):
            if stage.site_local:
                fit_stage(net, stage, p.images, p.train, p.targets, self.compute, None, round_seed(self.seed, i, 0))
        return net

    def scores(self, received: dict[str, torch.Tensor], local_state: dict | None) -> np.ndarray:
        """Probabilities (rows to score x outputs) of the site's final model (`final_network`)."""
        return self.score_with(self.final_network(received, local_state))

    def score_with(self, net: Network) -> np.ndarray:
        """Probabilities (rows to score x outputs) of `net` on this site's rows to score."""
        return predict(net, self.partition.images, self.partition.score, self.compute, None)

    def site_model(self, net: Network, received: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        """What makes `net`, the site's final model, differ from the global model (the arm's
        starting network with the aggregated tensors `received`): the tensors of its own groups
        (`sites.local_groups`, personalised groups, FedBN statistics) that are not the global
        model's. Only these leave the site, and only under `sites.cross_site_evaluation`.
        BatchNorm's `num_batches_tracked` counters stay, as in every round (`sharing.group_keys`):
        scoring never reads them."""
        reference = copy.deepcopy(self.start).cpu()
        reference.load_state_dict(received, strict=False)
        base = reference.state_dict()
        return OrderedDict((k, v.detach().cpu().clone()) for k, v in net.state_dict().items()
                           if not k.endswith("num_batches_tracked") and not torch.equal(v.detach().cpu(), base[k]))

    def cross_scores(self, received: dict[str, torch.Tensor], site_model: dict[str, torch.Tensor]) -> np.ndarray:
        """Probabilities on this site's rows to score of another site's model: the global model
        (the arm's starting network with the aggregated tensors `received`) with that site's own
        tensors `site_model` in place; nothing of this site's own state enters it."""
        net = self.network(None)
        net.load_state_dict(received, strict=False)
        net.load_state_dict(site_model, strict=False)
        return self.score_with(net)
