"""A federated fold on one machine, through Flower's simulation engine.

The server side (a Flower `ServerApp`) runs the round loop of `federated.rounds`, the one a
real deployment runs too. Each site is a Flower `ClientApp` on a virtual SuperNode that holds only its own rows; its
state between rounds (frozen groups, FedBN statistics) stays in the node's `context.state`.
At the end each site scores its own rows with its final model (the aggregated tensors over
its own state); the probabilities, and nothing else, come back for the study's evaluation.

Bytes sent down and up are counted per round and site, against what sending the whole
model each round would cost.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from stagewise.federated.client_app import make_client_app
from stagewise.federated.cross_site import exchange_site_models
from stagewise.federated.rounds import (AuditedGrid, FederatedError, FederatedResult, round_plan, serve_rounds,
                                        subset_of, wait_for_sites)
from stagewise.federated.sharing import from_start_of
from stagewise.federated.site import SitePartition, SiteTrainer
from stagewise.federated.wire import PackingGrid
from stagewise.models import Network
from stagewise.recipe import ArmConfig
from stagewise.training.compute import Compute, usable_cpus

__all__ = ["FederatedError", "FederatedResult", "run_federated", "simulation_backend"]


def run_federated(arm: ArmConfig, start: Network, partitions: list[SitePartition], compute: Compute,
                  seed: int, threads_per_site: int = 1, on_message=None) -> FederatedResult:
    """Train `start` across `partitions` (one per site) in Flower's simulation engine.

    `on_message(direction, message)` (direction "down" or "up") sees every Flower message the
    server sends and receives, as it crosses the wire: for audits and tests."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    cfg = arm.sites
    start = start.cpu()
    n = len(partitions)
    trainers = [SiteTrainer(p, arm, start, compute, seed) for p in partitions]
    plan = round_plan(arm, start.group_names)
    out = FederatedResult.starting_from(start)
    errors: list[BaseException] = []

    client = make_client_app(lambda context, config: InMemorySite(trainers, context, threads_per_site))

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            wire = PackingGrid(AuditedGrid(grid, on_message) if on_message else grid)
            wait_for_sites(wire, n, cfg.round_timeout)
            partition = lambda m: int(m.content["metrics"]["partition"])  # noqa: E731
            serve_rounds(wire, cfg, plan, start, out, n, order=partition,
                         site_of=lambda m: partitions[partition(m)].site)
            _collect_scores(wire, out, n, cfg.round_timeout)
            if cfg.cross_site_evaluation:  # opt-in: the site models leave their sites
                exchange_site_models(wire, out, cfg.round_timeout, partition)
        except BaseException as err:  # surfaced in the driver after the simulation ends
            errors.append(err)

    logging.getLogger("flwr").setLevel(logging.ERROR)  # its per-round INFO and deprecation notes
    run_simulation(server, client, num_supernodes=n, backend_config=simulation_backend(n, threads_per_site))
    if errors:
        raise errors[0]
    if len(out.scores) != n:
        raise FederatedError(f"only {len(out.scores)} of {n} sites returned their final scores")
    return out


class InMemorySite:
    """A site of a study's simulation: its partition in memory, its network between rounds
    (frozen groups, FedBN statistics) in its SuperNode's `context.state`."""

    def __init__(self, trainers: list[SiteTrainer], context, threads: int):
        self.partition = int(context.node_config["partition-id"])
        self.trainer, self.context, self.threads = trainers[self.partition], context, threads
        self.arm = self.trainer.arm

    def state(self) -> dict | None:
        record = self.context.state.get("site")
        return None if record is None else record.to_torch_state_dict()

    def greet(self, config) -> dict:
        raise FederatedError("a study's simulated site is not greeted")

    def train(self, config, received):
        from flwr.app import ArrayRecord

        torch.set_num_threads(self.threads)
        sent, state, n_examples, loss, accounting = self.trainer.train_round(
            received, self.state(), int(config["stage"]), int(config["round"]), str(config["trainable"]).split(","),
            float(config.get("proximal-mu", 0.0)), from_start_of(config))
        self.context.state["site"] = ArrayRecord(torch_state_dict=state)
        return sent, {"num-examples": n_examples, "loss": loss, "partition": self.partition, **accounting}

    def evaluate(self, config, received):
        from flwr.app import ArrayRecord

        torch.set_num_threads(self.threads)
        net = self.trainer.final_network(received, self.state())
        if self.trainer.arm.sites.cross_site_evaluation:  # kept here until the cross-site query asks for it
            self.context.state["site_model"] = ArrayRecord(torch_state_dict=self.trainer.site_model(net, received))
        return self.scored(self.trainer.score_with(net))

    def scored(self, prob: np.ndarray, **metrics) -> tuple[list, dict]:
        return [prob.astype(np.float32)], {"num-examples": len(self.trainer.partition.score),
                                           "partition": self.partition, **metrics}

    def site_model(self, config):
        """The site's own model tensors (kept by `evaluate`), for cross-site evaluation."""
        if self.context.state.get("site_model") is None:
            raise FederatedError("a site model was asked for, but this arm has no sites.cross_site_evaluation")
        return self.context.state["site_model"].to_torch_state_dict(), {"partition": self.partition}

    def cross_score(self, config, received, site_model):
        torch.set_num_threads(self.threads)
        model = int(config["model-partition"])
        return self.scored(self.trainer.cross_scores(received, site_model), **{"model-partition": model})


def simulation_backend(n_sites: int, threads_per_site: int = 1) -> dict:
    """Flower's Ray backend settings for `n_sites` virtual SuperNodes on this machine.

    Ray is told to start a private local instance (`address: local`): without it `ray.init`
    joins a cluster named by RAY_ADDRESS or the last `ray start` on this machine (e.g. one
    that runs stagewise's Ray executor), whose CPUs other work holds, and the sites' actors
    may never be scheduled; Flower shuts Ray down after each simulation, so nothing of it
    outlives the fold."""
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    return {"client_resources": {"num_cpus": threads_per_site, "num_gpus": 0.0},
            "init_args": {"address": "local", "num_cpus": max(1, min(n_sites * threads_per_site, usable_cpus())),
                          "include_dashboard": False, "log_to_driver": False}}


def _collect_scores(grid, out: FederatedResult, n: int, timeout: float) -> None:
    """Each site scores its own rows with the final aggregated tensors over its own state."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    down = ArrayRecord(torch_state_dict=subset_of(out.global_state, out.shared))
    messages = []
    for node in grid.get_node_ids():
        messages.append(Message(RecordDict({"arrays": down, "config": ConfigRecord({})}),
                                message_type=MessageType.EVALUATE, dst_node_id=node))
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            continue
        out.scores[int(reply.content["metrics"]["partition"])] = reply.content["scores"].to_numpy_ndarrays()[0]
