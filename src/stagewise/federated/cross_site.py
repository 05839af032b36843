"""Cross-site model evaluation (opt-in, `sites.cross_site_evaluation`), as NVFlare runs it:
after the final step each site sends the tensors of its own model that differ from the global
model (its `sites.local_groups`, its personalised groups) to the coordinator, which forwards
each site's model to every other site; each site scores its rows with every model it receives
and replies the way the final step does.

This is the one place a site's own model leaves its site. The messages are named for it
(`query.site_model` up, `evaluate.cross_site` down, the model under `site_model`), so an audit
of the wire sees exactly where; without the opt-in none of them is ever sent.
"""

from __future__ import annotations

from typing import Callable

from stagewise.federated.rounds import FederatedError, FederatedResult, subset_of

SITE_MODEL_QUERY = "query.site_model"
CROSS_SITE_EVALUATE = "evaluate.cross_site"


def _replies(grid, messages: list, timeout: float, what: str) -> list:
    """Every reply, or a FederatedError naming the failures: a matrix with holes would be read
    as if every site model had been scored everywhere."""
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failed = [str(m.error.reason)[:200] for m in replies if m.has_error()]
    if failed or len(replies) < len(messages):
        raise FederatedError(f"cross-site evaluation: {len(replies) - len(failed)} of {len(messages)} sites answered "
                             f"the {what}" + (f"; errors: {failed}" if failed else ""))
    return replies


def exchange_site_models(grid, out: FederatedResult, timeout: float, partition: Callable) -> None:
    """Collect each site's model and have every other site score it. `partition(reply)` names
    the replying site (its index); results go to `out.cross_scores[(model site, scoring site)]`
    and the bytes to `out.cross_site`."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    nodes = list(grid.get_node_ids())
    asks = [Message(RecordDict({"config": ConfigRecord({})}), message_type=SITE_MODEL_QUERY, dst_node_id=node)
            for node in nodes]
    models = {}  # site index -> (node id, its model's tensors)
    for reply in _replies(grid, asks, timeout, "request for its site model"):
        models[partition(reply)] = (reply.metadata.src_node_id, reply.content["site_model"].to_torch_state_dict())
    down = ArrayRecord(torch_state_dict=subset_of(out.global_state, out.shared))
    records = {a: ArrayRecord(torch_state_dict=tensors) for a, (_, tensors) in sorted(models.items())}
    forwards, bytes_down = [], 0
    for a, record in records.items():
        for b, (node, _) in sorted(models.items()):
            if a != b:
                forwards.append(Message(RecordDict({"arrays": down, "site_model": record,
                                                    "config": ConfigRecord({"model-partition": a})}),
                                        message_type=CROSS_SITE_EVALUATE, dst_node_id=node))
                bytes_down += record.count_bytes()
    for reply in _replies(grid, forwards, timeout, "cross-site scoring"):
        model = int(reply.content["metrics"]["model-partition"])
        out.cross_scores[(model, partition(reply))] = reply.content["scores"].to_numpy_ndarrays()[0]
    out.cross_site = {"site_model_bytes": {a: record.count_bytes() for a, record in records.items()},
                      "site_model_keys": {a: len(t) for a, (_, t) in sorted(models.items())},
                      "bytes_down_total": int(bytes_down)}
