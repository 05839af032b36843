"""`sites.secure_aggregation`: what the recipe accepts and refuses (naming the field and the
reason), the protocol's shares for a round's sites, the stated error bound, and a server-side
optimizer stepping from the unmasked mean exactly as from its own mean of the sites' replies."""

from collections import OrderedDict

import numpy as np
import pytest
import torch

from stagewise.federated.secure_aggregation import mean_as_reply, secure_summary
from stagewise.federated.wire import wire_value
from stagewise.recipe import ArmConfig
from stagewise.recipe.secure_aggregation import NEEDS_EACH_UPDATE, SecureAggregationConfig


def _arm(secure, **sites):
    return ArmConfig.model_validate({"name": "f", "backbone": "scratch:tinycnn",
                                     "stages": [{"kind": "probe", "rounds": 1, "epochs": 1}],
                                     "sites": {"mode": "federated", "secure_aggregation": secure, **sites}})


def test_true_is_flowers_defaults_and_false_is_none():
    assert _arm(True).sites.secure_aggregation == SecureAggregationConfig()
    assert SecureAggregationConfig().model_dump() == {"num_shares": None, "reconstruction_threshold": None,
                                                      "clipping_range": 8.0, "quantization_range": 2**22,
                                                      "max_weight": 1000.0}
    assert _arm(False).sites.secure_aggregation is None


@pytest.mark.parametrize("strategy", NEEDS_EACH_UPDATE)
def test_a_strategy_that_needs_each_sites_update_is_refused_with_the_reason(strategy):
    with pytest.raises(ValueError, match=f"secure_aggregation with strategy {strategy}") as err:
        _arm(True, strategy=strategy)
    assert "the coordinator sees only their sum" in str(err.value) and "use fedavg" in str(err.value)


def test_a_non_federated_arm_and_a_threshold_without_a_spare_share_are_refused():
    with pytest.raises(ValueError, match="sites.secure_aggregation is for a federated arm"):
        ArmConfig.model_validate({"name": "p", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe"}],
                                  "sites": {"secure_aggregation": True}})
    with pytest.raises(ValueError, match=r"reconstruction_threshold \(3\) must be below num_shares \(3\)"):
        _arm({"num_shares": 3, "reconstruction_threshold": 3})
    for ok in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        assert _arm(True, strategy=ok).sites.secure_aggregation is not None


def test_shares_default_to_every_site_and_the_threshold_to_a_majority():
    cfg = SecureAggregationConfig()
    assert [cfg.shares_and_threshold(n) for n in (2, 3, 4, 5)] == [(2, 2), (3, 2), (4, 3), (5, 3)]
    assert SecureAggregationConfig(num_shares=3).shares_and_threshold(7) == (3, 2)
    assert SecureAggregationConfig(reconstruction_threshold=4).shares_and_threshold(5) == (5, 4)


def test_the_error_bound_is_one_quantization_level_per_site_over_the_summed_weights():
    cfg = SecureAggregationConfig(clipping_range=1.0, quantization_range=2**10, max_weight=100)
    assert cfg.error_bound(3, 60) == pytest.approx(3 * (2 / 2**10) * 100 / 60)
    assert SecureAggregationConfig().error_bound(2, 1000) == pytest.approx(2 * 16 / 2**22)
    assert SecureAggregationConfig().error_bound(2, 40) == pytest.approx(1.9e-4, rel=0.01)  # the docs' example


@pytest.fixture
def in_a_server_app(monkeypatch):
    """Messages are made inside a ServerApp, which sets Flower's task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


@pytest.mark.parametrize("name", ["FedAvg", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad"])
def test_the_strategy_steps_from_the_unmasked_mean_as_from_the_sites_replies(name, in_a_server_app):
    import flwr.serverapp.strategy
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    rng = np.random.default_rng(0)
    start = OrderedDict(w=torch.zeros(4, dtype=torch.float64), b=torch.zeros(1, dtype=torch.float64))
    sites = [OrderedDict((k, torch.from_numpy(rng.normal(size=v.shape))) for k, v in start.items()) for _ in range(3)]
    examples = [10, 20, 30]
    replies = [Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=s), "metrics": MetricRecord({"num-examples": n})}),
                       dst_node_id=i, message_type=MessageType.TRAIN) for i, (s, n) in enumerate(zip(sites, examples))]
    mean = OrderedDict((k, sum(s[k] * n for s, n in zip(sites, examples)) / sum(examples)) for k in start)
    params = {"server_momentum": 0.9} if name == "FedAvgM" else {}
    plain, secure = (getattr(flwr.serverapp.strategy, name)(fraction_evaluate=0.0, **params) for _ in range(2))
    current = {plain: start, secure: start}
    for t in (1, 2):  # a second round: the server optimizer's moments carry over alike
        for strategy in (plain, secure):  # the round's instructions: the strategy keeps the arrays it sent
            strategy.configure_train(t, ArrayRecord(torch_state_dict=current[strategy]), ConfigRecord({}), _Grid())
        a, _ = plain.aggregate_train(t, replies)
        b, _ = secure.aggregate_train(t, [mean_as_reply(mean, {"num-examples": sum(examples)})])
        current = {plain: a.to_torch_state_dict(), secure: b.to_torch_state_dict()}
        assert all(torch.allclose(current[plain][k], current[secure][k], rtol=0, atol=1e-12) for k in start)
    if name != "FedAvg":  # the server optimizer moved away from the mean
        assert not torch.allclose(current[secure]["w"], mean["w"])


class _Grid:
    def get_node_ids(self):
        return [0, 1, 2]


def test_the_fits_record_says_how_many_rounds_were_aggregated_securely_and_the_largest_bound():
    cfg = SecureAggregationConfig(clipping_range=0.5)
    rounds = [{"round": 1}, {"round": 2, "secure_aggregation": {"error_bound": 2e-7}},
              {"round": 3, "secure_aggregation": {"error_bound": 5e-7}}]  # round 1 shared nothing (local groups)
    assert secure_summary(cfg, rounds) == {"protocol": "SecAgg+ (Flower)", **cfg.model_dump(),
                                           "rounds_aggregated_securely": 2, "largest_error_bound": 5e-7}


def test_the_wire_log_writes_secaggs_bytes_as_their_length_only():
    assert wire_value(b"\x01" * 97) == {"bytes": 97}
    assert wire_value([b"ab", b"cde"]) == {"bytes": 5, "items": 2}
    assert [wire_value(v) for v in (3, "setup", [1, 2], [])] == [3, "setup", [1, 2], []]


def test_the_sites_quantized_sum_must_fit_the_masks_modulus():
    from stagewise.recipe.secure_aggregation import secure_aggregation_problems

    sites = _arm({"quantization_range": 2**30}).sites
    assert secure_aggregation_problems(sites, 3) == []
    (problem,) = secure_aggregation_problems(sites, 4)
    assert "quantization_range (1073741824) times the 4 sites" in problem and "below 2^32" in problem


def test_a_site_under_secure_aggregation_refuses_a_plain_training_message():
    from stagewise.federated.secure_aggregation import SECURED, UnsecuredRound, check_secured

    with pytest.raises(UnsecuredRound, match="arm 'f' under secure aggregation.*reach the coordinator unmasked"):
        check_secured(_arm(True), {"stage": 0})
    check_secured(_arm(True), {"stage": 0, SECURED: True})  # what the site's own mod marks
    check_secured(_arm(None), {"stage": 0})


def test_a_coordinator_cannot_mark_a_plain_message_as_secured(in_a_server_app):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from stagewise.federated.secure_aggregation import SECURED, secure_aggregation_mod

    forged = Message(RecordDict({"config": ConfigRecord({"stage": 0, SECURED: True})}), dst_node_id=1,
                     message_type=MessageType.TRAIN)
    seen = secure_aggregation_mod(forged, None, lambda m, c: m)
    assert dict(seen.content["config"]) == {"stage": 0}
