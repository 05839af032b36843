"""Secure aggregation (`sites.secure_aggregation`, Flower's SecAgg+) in Flower's simulation:
the coordinator's messages, audited as they cross the wire, never hold a site's update, and
the unmasked mean is FedAvg's within the bound the round records."""

import numpy as np
import pytest
import torch

from stagewise.federated.simulation import run_federated
from stagewise.recipe import ArmConfig
from stagewise.recipe.secure_aggregation import SecureAggregationConfig

from test_federated import FP32, _digits, _net, _partition

pytestmark = pytest.mark.flower  # its Flower simulations share one Ray instance (conftest)

SECURE = {"clipping_range": 0.01, "quantization_range": 2**16, "max_weight": 12}
"""A coarse quantization (a level is 0.02 / 2^16 = 3.1e-7) so that its error shows; a round's
change of a probe (Adam, lr 1e-3, two steps) stays within the clipping range."""


def _arm(secure):
    return ArmConfig.model_validate({"name": "f", "backbone": "scratch:tinycnn",
                                     "stages": [{"kind": "probe", "rounds": 1, "epochs": 1, "batch_size": 8}],
                                     "sites": {"mode": "federated", "secure_aggregation": secure}})


def _updates(seen, start) -> dict[int, np.ndarray]:
    """Each site's update of the plain round, by partition: what it sent minus what it received.
    The plain round's head is still the starting weights: named in the message, not sent, and
    taken by each site from its own copy of `start`."""
    from stagewise.federated.sharing import from_start_of

    (down,) = {id(m.content["arrays"]): m for d, m in seen if d == "down" and m.metadata.message_type == "train"}.values()
    head = [k for k in start.state_dict() if k.startswith("head.")]
    assert len(down.content["arrays"]) == 0 and from_start_of(down.content["config"])[0] == head
    received = np.concatenate([start.state_dict()[k].numpy().ravel() for k in head]).astype(np.float64)
    return {int(m.content["metrics"]["partition"]):
            np.concatenate([a.ravel() for a in m.content["arrays"].to_numpy_ndarrays()]) - received
            for d, m in seen if d == "up" and m.metadata.message_type == "train"}


def test_the_coordinator_sees_masked_vectors_only_and_unmasks_fedavgs_mean(sites_manifest):
    images, targets = _digits(sites_manifest, 36)
    parts = [_partition(images, targets, np.arange(12 * i, 12 * i + 12), s) for i, s in enumerate("ABC")]
    plain_seen, secure_seen = [], []
    plain = run_federated(_arm(None), _net("scratch:tinycnn"), parts, FP32, 0,
                          on_message=lambda d, m: plain_seen.append((d, m)))
    secure = run_federated(_arm(SECURE), _net("scratch:tinycnn"), parts, FP32, 0,
                           on_message=lambda d, m: secure_seen.append((d, m)))
    updates = _updates(plain_seen, _net("scratch:tinycnn"))
    assert len(updates) == 3 and max(np.abs(u).max() for u in updates.values()) < SECURE["clipping_range"]
    spread = min(np.abs(updates[a] - updates[b]).max() for a in updates for b in updates if a < b)

    # every message a site sent the coordinator: no tensors, and no vector near any site's scaled update
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    up = [m for d, m in secure_seen if d == "up" and m.metadata.message_type == "train"]
    assert len(up) == 3 * 4  # the four SecAgg+ stages, three sites
    assert all(sum(len(r) for r in m.content.array_records.values()) == 0 for m in up)
    masked = [np.concatenate([bytes_to_ndarray(b).ravel()[1:] if i == 0 else bytes_to_ndarray(b).ravel()
                              for i, b in enumerate(m.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])])
              for m in up if Key.MASKED_PARAMETERS in m.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3
    level = 2 * SECURE["clipping_range"] / SECURE["quantization_range"]
    for vector in masked:
        for update in updates.values():  # the site's own quantized value (its weight is 12 / max_weight = 1)
            quantized = (update + SECURE["clipping_range"]) / level
            assert vector.shape == update.shape and np.mean(np.abs(vector - quantized) <= 1) < 0.01

    # the unmasked mean is FedAvg's within the recorded bound, and the round says how it was aggregated
    record = dict(secure.rounds[0]["secure_aggregation"])
    # every stage's bytes both ways: the tensors down, the masked vectors up, and the keys and shares
    assert record.pop("bytes_all_stages") > 3 * secure.rounds[0]["bytes_down_per_site"] + sum(secure.rounds[0]["bytes_up"])
    bound = SecureAggregationConfig(**SECURE).error_bound(3, 36)
    assert record == {"protocol": "SecAgg+", "num_shares": 3, "reconstruction_threshold": 2, "clipping_range": 0.01,
                      "quantization_range": 2**16, "max_weight": 12.0, "error_bound": pytest.approx(bound)}
    assert bound == pytest.approx(3 * level * 12 / 36)
    diff = max((secure.global_state[k].double() - plain.global_state[k].double()).abs().max().item()
               for k in plain.shared)
    assert secure.shared == plain.shared and 0 < diff <= bound + 1e-7 and bound < spread / 50
    assert secure.rounds[0]["loss"] == pytest.approx(plain.rounds[0]["loss"], rel=1e-9)
    assert secure.rounds[0]["site_loss"] == plain.rounds[0]["site_loss"]
