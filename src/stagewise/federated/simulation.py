"""A federated fold on one machine, through Flower's simulation engine.

The server side (a Flower `ServerApp`) walks the arm's stages round by round: for each round
it works out which groups train (a thaw stage unfreezes at fractions of its rounds), sends
those groups' tensors only through the strategy's `configure_train`, and aggregates the
replies with the strategy's `aggregate_train` (FedAvg, FedProx or FedAdam, Flower's own).
Each site is a Flower `ClientApp` on a virtual SuperNode that holds only its own rows; its
state between rounds (frozen groups, FedBN statistics) stays in the node's `context.state`.
At the end each site scores its own rows with its final model (the aggregated tensors over
its own state); the probabilities, and nothing else, come back for the study's evaluation.

Bytes sent down and up are counted per round and site, against what sending the whole
model each round would cost.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from stagewise.federated.sharing import shared_keys, tensor_bytes
from stagewise.federated.site import SitePartition, SiteTrainer
from stagewise.models import Network
from stagewise.recipe import ArmConfig, SitesConfig
from stagewise.training.compute import Compute
from stagewise.training.engine import plan_stage

log = logging.getLogger("stagewise")


class FederatedError(RuntimeError):
    """A federated fold that could not complete (too few sites replied, a bad strategy)."""


def make_strategy(cfg: SitesConfig, n_sites: int):
    """The Flower strategy named by the recipe, sampling every site in each round."""
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    cls = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}[cfg.strategy]
    try:
        return cls(fraction_evaluate=0.0, min_train_nodes=n_sites, min_available_nodes=n_sites,
                   **cfg.strategy_params)
    except TypeError as err:
        raise FederatedError(f"sites.strategy_params for {cfg.strategy}: {err}") from None


def round_plan(arm: ArmConfig, group_names: list[str]) -> list[tuple[int, int, list[str]]]:
    """(stage index among the fold stages, round in stage, trainable groups) for every round."""
    plan = []
    for i, stage in enumerate(s for s in arm.stages if not s.external):
        by_round = plan_stage(stage.model_copy(update={"epochs": stage.rounds}), group_names)
        plan += [(i, r, by_round.trainable(r)) for r in range(stage.rounds)]
    return plan


@dataclass
class FederatedResult:
    scores: dict[int, np.ndarray]
    """Partition index -> probabilities of its `score` rows from its site's final model."""
    global_state: "OrderedDict[str, torch.Tensor]"
    """The server's model: starting weights with every aggregated tensor in place."""
    rounds: list[dict] = field(default_factory=list)
    """Per round: stage, groups, bytes down/up per site, sites that replied, mean loss."""
    full_model_bytes: int = 0
    shared: list[str] = field(default_factory=list)
    """Every state-dict key that was aggregated in some round, in state-dict order."""


def run_federated(arm: ArmConfig, start: Network, partitions: list[SitePartition], compute: Compute,
                  seed: int, threads_per_site: int = 1, on_message=None) -> FederatedResult:
    """Train `start` across `partitions` (one per site) in Flower's simulation engine.

    `on_message(direction, message)` (direction "down" or "up") sees every Flower message the
    server sends and receives, as it crosses the wire: for audits and tests."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    cfg = arm.sites
    start = start.cpu()
    n = len(partitions)
    trainers = [SiteTrainer(p, arm, start, compute, seed) for p in partitions]
    plan = round_plan(arm, start.group_names)
    out = FederatedResult({}, OrderedDict((k, v.detach().clone()) for k, v in start.state_dict().items()),
                          full_model_bytes=tensor_bytes(start.state_dict()))
    errors: list[BaseException] = []

    client = ClientApp()

    def _state(context: Context) -> dict | None:
        rec = context.state.get("site")
        return None if rec is None else rec.to_torch_state_dict()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads_per_site)
        trainer = trainers[int(context.node_config["partition-id"])]
        c = msg.content["config"]
        received = msg.content["arrays"].to_torch_state_dict()
        sent, state, n_examples, loss = trainer.train_round(
            received, _state(context), int(c["stage"]), int(c["round"]), str(c["trainable"]).split(","),
            float(c.get("proximal-mu", 0.0)))
        context.state["site"] = ArrayRecord(torch_state_dict=state)
        return Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=sent),
                                   "metrics": MetricRecord({"num-examples": n_examples, "loss": loss,
                                                            "partition": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads_per_site)
        trainer = trainers[int(context.node_config["partition-id"])]
        prob = trainer.scores(msg.content["arrays"].to_torch_state_dict(), _state(context))
        return Message(RecordDict({"scores": ArrayRecord([prob.astype(np.float32)]),
                                   "metrics": MetricRecord({"num-examples": len(trainer.partition.score),
                                                            "partition": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            wire = _AuditedGrid(grid, on_message) if on_message else grid
            _serve(wire, cfg, plan, start, out, n)
            _collect_scores(wire, out, n, cfg.round_timeout)
        except BaseException as err:  # surfaced in the driver after the simulation ends
            errors.append(err)

    logging.getLogger("flwr").setLevel(logging.ERROR)  # its per-round INFO and deprecation notes
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    run_simulation(server, client, num_supernodes=n, backend_config={
        "client_resources": {"num_cpus": threads_per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, min(n * threads_per_site, os.cpu_count() or 1)),
                      "include_dashboard": False, "log_to_driver": False},
    })
    if errors:
        raise errors[0]
    if len(out.scores) != n:
        raise FederatedError(f"only {len(out.scores)} of {n} sites returned their final scores")
    return out


class _AuditedGrid:
    """A Flower Grid that shows every message sent and received to `on_message`."""

    def __init__(self, grid, on_message):
        self.grid, self.on_message = grid, on_message

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout):
        messages = list(messages)
        for m in messages:
            self.on_message("down", m)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for m in replies:
            self.on_message("up", m)
        return replies


def _node_sites(grid, n: int, timeout: float) -> list[int]:
    t0 = time.monotonic()
    while len(ids := list(grid.get_node_ids())) < n:
        if time.monotonic() - t0 > timeout:
            raise FederatedError(f"{len(ids)} of {n} sites connected within {timeout:.0f} s")
        time.sleep(0.2)
    return ids


def _serve(grid, cfg: SitesConfig, plan, start: Network, out: FederatedResult, n: int) -> None:
    from flwr.app import ArrayRecord, ConfigRecord

    _node_sites(grid, n, cfg.round_timeout)
    need = cfg.min_sites or n
    strategy, keys_before = None, None
    for t, (stage_index, r, trainable) in enumerate(plan, start=1):
        keys = shared_keys(start, trainable, cfg.bn_stats)
        if keys != keys_before:  # a fresh server optimizer (FedAdam) whenever the shared set changes
            strategy, keys_before = make_strategy(cfg, n), keys
        down = ArrayRecord(torch_state_dict=subset_of(out.global_state, keys))
        config = ConfigRecord({"stage": stage_index, "round": r, "trainable": ",".join(trainable)})
        replies = list(grid.send_and_receive(strategy.configure_train(t, down, config, grid), timeout=cfg.round_timeout))
        # Aggregated in site order, not arrival order: float sums then come out the same every run.
        ok = sorted((m for m in replies if not m.has_error()), key=lambda m: int(m.content["metrics"]["partition"]))
        failed = [str(m.error.reason)[:200] for m in replies if m.has_error()]
        if len(ok) < need:
            raise FederatedError(f"round {t}: {len(ok)} of {n} sites replied (sites.min_sites is {need})"
                                 + (f"; errors: {failed}" if failed else ""))
        arrays, metrics = strategy.aggregate_train(t, ok)
        for k, v in arrays.to_torch_state_dict().items():
            out.global_state[k] = v.to(out.global_state[k].dtype)
        out.shared = [k for k in out.global_state if k in set(out.shared) | set(keys)]
        out.rounds.append({
            "round": t, "stage": stage_index, "round_in_stage": r, "trainable": trainable,
            "bytes_down_per_site": down.count_bytes(), "bytes_up": [m.content["arrays"].count_bytes() for m in ok],
            "tensor_bytes_per_site": tensor_bytes(subset_of(out.global_state, keys)),
            "sites_replied": len(ok), "sites": n, "failures": failed,
            "loss": float(metrics["loss"]) if metrics is not None and "loss" in metrics else None,
        })
        if failed:
            log.warning("federated round %d completed with %d of %d sites: %s", t, len(ok), n, failed)


def subset_of(state: dict[str, torch.Tensor], keys: list[str]) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, state[k]) for k in keys)


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
