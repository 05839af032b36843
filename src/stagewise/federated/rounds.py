"""The server side of a federated fit, whatever carries the messages.

One loop (`serve_rounds`) walks an arm's stages round by round: for each round it works out
which groups train (a thaw stage unfreezes at fractions of its rounds), sends those groups'
tensors only through the Flower strategy's `configure_train`, and aggregates the replies with
its `aggregate_train` (Flower's own: FedAvg, FedProx, the server-side optimizers, the robust
aggregators; `recipe.strategies` lists them). The same loop runs inside Flower's simulation
engine (`federated.simulation`, the embedded default of a study) and in a real deployment over
the network (`federated.deployment`), so the two give the same numbers. Groups named in
`sites.local_groups` never travel, and `site_local` stages are no rounds: each site runs them
alone in its final step (`site.SiteTrainer.scores`).

Replies are aggregated in a fixed site order, not arrival order, so float sums repeat run to
run. A round with fewer replies than `sites.min_sites` fails; fewer than all but enough
completes and is recorded. `on_round` sees the state after every finished round (the
deployment checkpoints it), and `resume` continues after the last finished one.

Under `sites.secure_aggregation` a round's messages go through Flower's SecAgg+
(`secure_aggregation.secure_round`): the coordinator gets the sites' unmasked mean, never a
site's tensors, and the strategy aggregates that mean as one reply.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from stagewise.federated.secure_aggregation import SecureResult, SiteReply, mean_as_reply, secure_round
from stagewise.federated.sharing import FROM_START, START_SHA256, shared_keys, state_digest, tensor_bytes
from stagewise.models import Network
from stagewise.recipe import ArmConfig, SitesConfig
from stagewise.recipe.strategies import STRATEGIES, strategy_param_problems
from stagewise.training.engine import plan_stage
from stagewise.federated.job import FederatedError
from stagewise.quiet import flower_noise_to_log

log = logging.getLogger("stagewise")


def make_strategy(cfg: SitesConfig, n_sites: int):
    """The Flower strategy named by the recipe (`recipe.strategies` holds the table), with its
    parameters (whole-number ones as int). It samples every connected site in each round and
    needs at least `sites.min_sites` of them (default: all)."""
    import flwr.serverapp.strategy

    flower_noise_to_log()  # its note that federated evaluation is skipped: stagewise scores the sites itself
    spec = STRATEGIES[cfg.strategy]
    problems = strategy_param_problems(cfg.strategy, cfg.strategy_params)
    need = min(cfg.min_sites or n_sites, n_sites)
    if problems:
        raise FederatedError(f"sites.strategy_params for {cfg.strategy}: {'; '.join(problems)}")
    params = {k: int(v) if spec.params[k].integer else v for k, v in cfg.strategy_params.items()}
    cls = getattr(flwr.serverapp.strategy, spec.flower)
    return cls(fraction_evaluate=0.0, min_train_nodes=need, min_available_nodes=need, **params)


def round_plan(arm: ArmConfig, group_names: list[str]) -> list[tuple[int, int, list[str]]]:
    """(stage index among the fold stages, round in stage, trainable groups) for every round."""
    plan = []
    for i, stage in enumerate(s for s in arm.stages if not s.external):
        if stage.site_local:  # personalisation: at each site alone, after the rounds (site.SiteTrainer.scores)
            continue
        by_round = plan_stage(stage.model_copy(update={"epochs": stage.rounds}), group_names)
        plan += [(i, r, by_round.trainable(r)) for r in range(stage.rounds)]
    return plan


@dataclass
class FederatedResult:
    scores: dict[int, object] = field(default_factory=dict)
    """Partition index -> what its site returned at the end (probabilities in a study's
    simulation, scalar metrics in a deployment)."""
    global_state: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)
    """The server's model: starting weights with every aggregated tensor in place."""
    rounds: list[dict] = field(default_factory=list)
    """Per round: stage, groups, bytes down/up per site, sites that replied, the training loss
    of each site that replied (`site_loss`, with its `site_examples`) and their weighted mean
    (`loss`: the strategy's aggregate, weighted by training examples)."""
    full_model_bytes: int = 0
    shared: list[str] = field(default_factory=list)
    """Every state-dict key that was aggregated in some round, in state-dict order."""
    cross_scores: dict[tuple[int, int], object] = field(default_factory=dict)
    """Cross-site evaluation only: (model's site, scoring site) -> the scoring site's probabilities."""
    cross_site: dict = field(default_factory=dict)
    """Cross-site evaluation only: the bytes and tensor counts of the site models that travelled."""

    @classmethod
    def starting_from(cls, start: Network) -> "FederatedResult":
        state = start.state_dict()
        return cls(global_state=OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items()),
                   full_model_bytes=tensor_bytes(state))


class AuditedGrid:
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


class AdmittedGrid:
    """A Flower Grid restricted to `nodes`: only they are counted, sent messages and heard.
    A reply from any other node (a key the coordinator did not list, a site that joined
    after the greeting checked its recipe) is dropped and kept in `dropped` for the record."""

    def __init__(self, grid, nodes):
        self.grid, self.nodes, self.dropped = grid, set(nodes), []

    def get_node_ids(self):
        return [n for n in self.grid.get_node_ids() if n in self.nodes]

    def send_and_receive(self, messages, timeout):
        replies = []
        for m in self.grid.send_and_receive([m for m in messages if m.metadata.dst_node_id in self.nodes],
                                            timeout=timeout):
            if m.metadata.src_node_id in self.nodes:
                replies.append(m)
            else:
                self.dropped.append(int(m.metadata.src_node_id))
        return replies

    def take_dropped(self) -> list[int]:
        dropped, self.dropped = self.dropped, []
        return dropped


def wait_for_sites(grid, n: int, timeout: float) -> list[int]:
    """Node ids once `n` sites are connected, or a FederatedError after `timeout` seconds."""
    t0 = time.monotonic()
    while len(ids := list(grid.get_node_ids())) < n:
        if time.monotonic() - t0 > timeout:
            raise FederatedError(f"{len(ids)} of {n} sites connected within {timeout:.0f} s")
        time.sleep(0.2)
    return ids


def subset_of(state: dict[str, torch.Tensor], keys: list[str]) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, state[k]) for k in keys)


def serve_rounds(grid, cfg: SitesConfig, plan, start: Network, out: FederatedResult, n: int,
                 order: Callable, extra_config: dict | None = None, resume: int = 0,
                 on_round: Callable[[int, FederatedResult], None] | None = None,
                 site_of: Callable | None = None) -> None:
    """Run the rounds of `plan` after round `resume` (0: from the start), aggregating into `out`.

    `order(message)` gives the sort key of a reply (its site), `site_of(message)` the site's
    name in the round records (default: `order`'s key), `extra_config` goes into every round's
    config (the deployment names the fit there)."""
    from flwr.app import ArrayRecord, ConfigRecord

    need = min(cfg.min_sites or n, n)
    strategy, keys_before = None, None
    start_digest = state_digest(start.state_dict())  # each site checks its own against it (sharing.py)
    for t, (stage_index, r, trainable) in enumerate(plan, start=1):
        keys = shared_keys(start, trainable, cfg.bn_stats, cfg.local_groups)
        if keys != keys_before:  # a fresh server optimizer (FedAdam) whenever the shared set changes
            strategy, keys_before = make_strategy(cfg, n), keys
        if t <= resume:
            continue
        config = {"stage": stage_index, "round": r, "trainable": ",".join(trainable), "step": t,
                  START_SHA256: start_digest, **(extra_config or {})}
        # tensors no round has aggregated yet are the starting weights every site holds and has
        # checked: their names travel instead (sharing.py); SecAgg+ masks the change to all it sends
        shared = set(out.shared)
        held = [] if cfg.secure_aggregation is not None else [k for k in keys if k not in shared]
        down_state = subset_of(out.global_state, [k for k in keys if k in shared] if held else keys)
        down = ArrayRecord(torch_state_dict=down_state)
        if held:
            config[FROM_START] = ",".join(held)
        secure = None
        if cfg.secure_aggregation is not None and keys:  # Flower's SecAgg+: only the sites' mean is seen
            secure = secure_round(grid, cfg.secure_aggregation, t, list(grid.get_node_ids()), down_state, config,
                                  cfg.round_timeout)
            replies = secure.replies
        else:
            # the strategy sees every shared tensor (a server optimizer steps from them all); the
            # messages carry only those the sites do not hold
            full = ArrayRecord(torch_state_dict=subset_of(out.global_state, keys)) if held else down
            messages = list(strategy.configure_train(t, full, ConfigRecord(config), grid))
            if held:
                for m in messages:
                    m.content["arrays"] = down
            replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        dropped = grid.take_dropped() if isinstance(grid, AdmittedGrid) else []
        ok = sorted((m for m in replies if not m.has_error()), key=order)
        failed = [str(m.error.reason)[:200] for m in replies if m.has_error()] + (secure.failures if secure else [])
        if secure is None:  # a reply must carry exactly the round's tensors, or it would be averaged in part
            complete = lambda m: set(m.content["arrays"].keys()) == set(keys)  # noqa: E731
            failed += [f"site {(site_of or order)(m)} sent {len(m.content['arrays'])} tensors, not the round's "
                       f"{len(keys)}: does it run another stagewise version?" for m in ok if not complete(m)]
            ok = [m for m in ok if complete(m)]
        if len(ok) < need or (secure is not None and secure.halted):
            raise FederatedError(f"round {t}: {len(ok)} of {n} sites replied (sites.min_sites is {need})"
                                 + (f"; {secure.halted}" if secure is not None and secure.halted else "")
                                 + (f"; errors: {failed}" if failed else ""))
        arrays, metrics = _aggregate(strategy, t, ok, keys, cfg.strategy, secure)
        for k, v in arrays.items():
            out.global_state[k] = v.to(out.global_state[k].dtype)
        out.shared = [k for k in out.global_state if k in set(out.shared) | set(keys)]
        out.rounds.append({
            "round": t, "stage": stage_index, "round_in_stage": r, "trainable": trainable,
            "bytes_down_per_site": down.count_bytes(), "bytes_up": [_bytes_up(m) for m in ok],
            "bytes_held_per_site": tensor_bytes(subset_of(out.global_state, held)),
            "tensor_bytes_per_site": tensor_bytes(subset_of(out.global_state, keys)),
            "sites_replied": len(ok), "sites": n, "failures": failed + ["no reply"] * max(0, n - len(ok) - len(failed)),
            "loss": float(metrics["loss"]) if metrics is not None and "loss" in metrics else None,
            **_site_losses(ok, site_of or (lambda m: str(order(m)))),
            **_site_privacy(ok, site_of or (lambda m: str(order(m)))),
            **({"dropped_replies_from_nodes": dropped} if dropped else {}),
            **({"secure_aggregation": secure.settings} if secure is not None else {}),
        })
        if dropped:
            log.warning("federated round %d: replies from nodes %s dropped (not sites of this job)", t, dropped)
        if len(ok) < n:
            log.warning("federated round %d completed with %d of %d sites: %s", t, len(ok), n,
                        out.rounds[-1]["failures"])
        if on_round is not None:
            on_round(t, out)


def _aggregate(strategy, t: int, replies: list, keys: list[str], name: str,
               secure: SecureResult | None = None) -> tuple[dict, dict | None]:
    """The strategy's aggregate of the round's replies (tensors by key, metrics). A round in
    which only `sites.local_groups` train shares nothing: there is nothing to aggregate, and
    the loss is the replies' mean weighted by training examples, as the strategies weigh it.
    Under secure aggregation the strategy aggregates one reply, the sites' unmasked mean with
    all their examples: FedAvg's aggregate of it is the mean itself, and a server-side
    optimizer (FedAdam, ...) steps from it as it would from its own mean."""
    n = [float(m.content["metrics"]["num-examples"]) for m in replies]
    losses = [float(m.content["metrics"].get("loss", float("nan"))) for m in replies]
    mean_loss = {"loss": sum(a * b for a, b in zip(n, losses)) / sum(n)} if sum(n) else None
    if not keys:
        return {}, mean_loss
    if secure is not None:
        replies = [mean_as_reply(secure.mean, {"num-examples": sum(n), **(mean_loss or {})})]
    arrays, metrics = strategy.aggregate_train(t, replies)
    if arrays is None:  # e.g. Bulyan with fewer than 4f + 3 replies
        raise FederatedError(f"round {t}: {name} aggregated nothing from {len(replies)} replies "
                             "(too few sites for its strategy_params); see `stagewise validate`")
    return arrays.to_torch_state_dict(), metrics


def _bytes_up(reply) -> int:
    """Bytes of a site's tensors in its reply; under secure aggregation, of its masked vector."""
    return reply.masked_bytes if isinstance(reply, SiteReply) else reply.content["arrays"].count_bytes()


def _site_losses(replies: list, site_of: Callable) -> dict:
    """Each replying site's mean training loss of the round and its training examples (the
    weights of the round's `loss`), by site name; sites that sent no loss are left out."""
    losses, examples = {}, {}
    for m in replies:
        metrics = m.content["metrics"]
        if "loss" in metrics:
            name = str(site_of(m))
            losses[name], examples[name] = float(metrics["loss"]), int(metrics["num-examples"])
    return {"site_loss": losses, "site_examples": examples}


def _site_privacy(replies: list, site_of: Callable) -> dict:
    """Each replying site's DP-SGD steps of the round (noise multiplier, sampling rate, steps),
    by site name, for the accountant (`site_privacy`); nothing when no site ran DP-SGD."""
    out = {}
    for m in replies:
        metrics = m.content["metrics"]
        if "dp-steps" in metrics:
            out[str(site_of(m))] = {"noise_multiplier": float(metrics["dp-noise"]),
                                    "sample_rate": float(metrics["dp-rate"]), "steps": int(metrics["dp-steps"])}
    return {"site_privacy": out} if out else {}
