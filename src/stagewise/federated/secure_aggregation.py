"""A training round under secure aggregation: Flower's own SecAgg+ workflow at the
coordinator and its `secaggplus_mod` at each site, between stagewise's round loop and
ClientApp.

Flower 1.41 runs SecAgg+ only through its legacy API: the workflow asks a legacy `Strategy`
for the round's instructions (`configure_fit`) and hands it the unmasked mean
(`aggregate_fit`), and the mod masks a reply in the legacy `FitRes` layout. This module is
the thin adapter: `secure_round` runs the workflow's four stages (keys, key shares, masked
vectors, unmasking) over the round's Grid with a legacy strategy that only carries the
round's tensors in and the mean out; `secure_aggregation_mod` (a ClientApp mod) turns the
site's reply into what the mod masks. No cryptography is stagewise's own.

What each site masks is its change to the tensors it received (sent minus received), not
the tensors themselves: a round's change is small, so Flower's clipping range bounds it
comfortably, and the coordinator adds the mean change to the tensors it sent, which is the
weighted mean of the sites' tensors (FedAvg's aggregate) within the quantization error
(`SecureAggregationConfig.error_bound`). The stochastic rounding of the quantization is
seeded at the site from its own change, so a job repeats exactly (masks cancel exactly).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from stagewise.errors import StagewiseError
from stagewise.recipe.secure_aggregation import SecureAggregationConfig

KEYS = "shared-keys"
"""Config entry with the round's tensor names, in order (the legacy layout carries no names)."""
SECURED = "secure-aggregation"
"""Config entry the site's own mod gives its training handler for a round that came through
SecAgg+ (and strips from any other message, so a coordinator cannot set it)."""


class UnsecuredRound(StagewiseError, RuntimeError):
    """A plain training message to a site whose recipe asks for secure aggregation."""


def check_secured(arm, config) -> None:
    """Refuse a training message that did not come through SecAgg+ when the site's arm asks
    for secure aggregation: the site's update would reach the coordinator unmasked."""
    if arm.sites.secure_aggregation is not None and not config.get(SECURED):
        raise UnsecuredRound(f"this site's recipe trains arm {arm.name!r} under secure aggregation "
                             "(sites.secure_aggregation) and the coordinator sent a plain training message: refused, "
                             "the site's update would reach the coordinator unmasked. The coordinator must run the "
                             "same recipe; ask its operator")


@dataclass
class SiteReply:
    """A site's answer to a secure round as the round loop reads replies: its node, its
    training metrics; its tensors are not there (the coordinator has only the sum)."""

    metadata: object
    content: dict
    masked_bytes: int = 0
    """Bytes of the masked vector the site uploaded."""

    def has_error(self) -> bool:
        return False


@dataclass
class SecureResult:
    mean: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)
    """The unmasked weighted mean of the sites' tensors, by key."""
    replies: list[SiteReply] = field(default_factory=list)
    """The sites whose masked vectors were summed."""
    failures: list[str] = field(default_factory=list)
    halted: str | None = None
    """Why the protocol stopped before the mean was unmasked (too few sites left)."""
    settings: dict = field(default_factory=dict)
    """The round's protocol settings and the aggregate's error bound, for the round record."""


def _legacy_strategy(fitins_of, on_aggregate):
    """A Flower legacy Strategy that only hands the round's instructions to the workflow and
    its unmasked mean back: stagewise's own strategy aggregates from that mean."""
    from flwr.server.strategy import Strategy

    class Carrier(Strategy):
        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return fitins_of(parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            on_aggregate(results, failures)
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return Carrier()


class _ReplyRecorder:
    """The round's Grid, keeping the masked-vector replies (stage 2 of SecAgg+) by node and
    counting the bytes of every stage's messages both ways (tensors, keys, shares, masked vectors)."""

    def __init__(self, grid):
        self.grid, self.masked, self.bytes = grid, {}, 0

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout):
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.bytes += sum(_payload_bytes(m) for m in messages + replies if not m.has_error())
        for m in replies:
            if not m.has_error() and "fitres.metrics" in m.content.config_records:
                self.masked[int(m.metadata.src_node_id)] = m
        return replies


def _payload_bytes(message) -> int:
    """Bytes of a message's tensors and of the bytes values of its config records."""
    total = sum(int(r.count_bytes()) for r in message.content.array_records.values())
    for record in message.content.config_records.values():
        for v in record.values():
            total += sum(len(b) for b in (v if isinstance(v, list) else [v]) if isinstance(b, bytes))
    return total


def secure_round(grid, cfg: SecureAggregationConfig, t: int, nodes: list[int],
                 down: "OrderedDict[str, torch.Tensor]", config: dict, timeout: float) -> SecureResult:
    """One training round of `nodes` under SecAgg+: the tensors `down` and `config` go to
    every site; what comes back is the unmasked weighted mean of the sites' tensors."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, parameters_to_ndarrays
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    keys = list(down)
    shares, threshold = cfg.shares_and_threshold(len(nodes))
    out, recorder = SecureResult(), _ReplyRecorder(grid)
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node, recorder, 0))
    instruction = {**config, KEYS: ",".join(keys)}

    def fitins_of(parameters, client_manager):
        return [(proxy, FitIns(parameters, dict(instruction))) for proxy in client_manager.all().values()]

    def on_aggregate(results, failures):
        mean = parameters_to_ndarrays(results[0][1].parameters) if results else []
        out.mean = OrderedDict((k, torch.from_numpy(np.asarray(down[k].double().numpy() + d)))
                               for k, d in zip(keys, mean))
        out.failures = [str(f)[:200] for f in failures]

    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=_legacy_strategy(fitins_of, on_aggregate), client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: t})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(torch_state_dict=down)
    workflow = SecAggPlusWorkflow(1.0 if shares == len(nodes) else shares, threshold,
                                  max_weight=cfg.max_weight, clipping_range=cfg.clipping_range,
                                  quantization_range=cfg.quantization_range, timeout=timeout)
    workflow(recorder, context)
    if not out.mean and keys:
        out.halted = (f"secure aggregation halted ({len(recorder.masked)} of {len(nodes)} sites sent masked "
                      f"updates; each site needs {threshold} of its {shares} neighbours to finish the round)")
    out.replies = [_site_reply(m) for m in recorder.masked.values()]
    examples = sum(float(r.content["metrics"]["num-examples"]) for r in out.replies)
    out.settings = {"protocol": "SecAgg+", "num_shares": shares, "reconstruction_threshold": threshold,
                    "clipping_range": cfg.clipping_range, "quantization_range": cfg.quantization_range,
                    "max_weight": cfg.max_weight, "bytes_all_stages": recorder.bytes,
                    "error_bound": cfg.error_bound(len(out.replies), examples) if examples else None}
    return out


def mean_as_reply(mean: "OrderedDict[str, torch.Tensor]", metrics: dict):
    """The sites' unmasked mean as one reply carrying all their examples (`metrics`: the
    round's `num-examples` in all and its weighted loss), for a Flower strategy to aggregate:
    FedAvg's aggregate of one reply is that reply, and a server-side optimizer (FedAdam, ...)
    steps from it exactly as from the mean it computes of the sites' own replies."""
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    return Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=mean), "metrics": MetricRecord(metrics)}),
                   dst_node_id=0, message_type=MessageType.TRAIN)


def _site_reply(message) -> SiteReply:
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    metrics = dict(message.content.config_records["fitres.metrics"])
    masked = message.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    return SiteReply(message.metadata, {"metrics": MetricRecord(metrics), "arrays": ArrayRecord()},
                     sum(len(b) for b in masked))


def secure_aggregation_mod(msg, context, call_next):
    """A ClientApp mod: a training message of a SecAgg+ round goes through Flower's
    `secaggplus_mod`, which masks the site's change to the tensors it received; any other
    message passes untouched but for a `SECURED` entry, which only this mod sets. The global
    NumPy random state is restored afterwards."""
    from flwr.app import MessageType
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        if msg.metadata.message_type == MessageType.TRAIN and "config" in msg.content.config_records:
            msg.content.config_records["config"].pop(SECURED, None)  # only this mod says a round was secured
        return call_next(msg, context)
    random_state = np.random.get_state()
    try:
        return secaggplus_mod(msg, context, lambda m, c: _train_as_fitres(m, c, call_next))
    finally:
        np.random.set_state(random_state)


def _train_as_fitres(msg, context, call_next):
    """The site's training handler on a legacy FitIns message, its reply as the FitRes of its
    change (sent minus received) that `secaggplus_mod` masks."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = str(fitins.config[KEYS]).split(",") if fitins.config.get(KEYS) else []
    received = OrderedDict(zip(keys, parameters_to_ndarrays(fitins.parameters)))
    config = {**{k: v for k, v in fitins.config.items() if k != KEYS}, SECURED: True}
    tensors = OrderedDict((k, torch.from_numpy(v)) for k, v in received.items())
    msg.content = RecordDict({"arrays": ArrayRecord(torch_state_dict=tensors), "config": ConfigRecord(config)})
    reply = call_next(msg, context)  # the handler sees the round as it does without secure aggregation
    if reply.has_error():
        return reply
    sent = reply.content["arrays"].to_numpy_ndarrays()
    change = [np.asarray(s, dtype=np.float64) - np.asarray(r, dtype=np.float64) for s, r in zip(sent, received.values())]
    np.random.seed(_rounding_seed(change))
    metrics = dict(reply.content["metrics"])
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(change), int(metrics["num-examples"]), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _rounding_seed(change: list[np.ndarray]) -> int:
    """A seed for the quantization's stochastic rounding from the site's own change: the same
    change rounds the same way in every run (the masks are random, and cancel exactly)."""
    digest = hashlib.blake2b(digest_size=4)
    for array in change:
        digest.update(np.ascontiguousarray(array).tobytes())
    return int.from_bytes(digest.digest(), "little")


def secure_summary(cfg: SecureAggregationConfig, rounds: list[dict]) -> dict:
    """What metrics.json and a deployment's results.json say of a fit's secure aggregation:
    the recipe's settings, how many rounds were aggregated under it (a round in which only
    `sites.local_groups` train sends nothing to aggregate) and the largest error bound of the
    unmasked mean over those rounds."""
    bounds = [r["secure_aggregation"]["error_bound"] for r in rounds if "secure_aggregation" in r]
    return {"protocol": "SecAgg+ (Flower)", **cfg.model_dump(), "rounds_aggregated_securely": len(bounds),
            "largest_error_bound": max((b for b in bounds if b is not None), default=None)}
