"""Every Flower strategy name the recipe accepts (`recipe.strategies.STRATEGIES`, not a
hand-picked few) aggregates one real round in Flower's simulation engine (three sites, a
probe round), each as its method says; its parameters reach Flower's class; and a bad
parameter (a name it does not take, a value out of range, too few sites for a robust
aggregator's `num_malicious_nodes`) is refused before anything trains, naming the field."""

from __future__ import annotations

import inspect
from typing import get_args

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from stagewise.recipe import ArmConfig, RecipeError, SitesConfig, recipe_from_dict
from stagewise.recipe.strategies import STRATEGIES

pytestmark = pytest.mark.flower  # its Flower simulations share one Ray instance (conftest)

STRATEGY_LIST = get_args(SitesConfig.model_fields["strategy"].annotation)
SITES = ("A", "B", "C")  # Bulyan (f = 0) and Krum need three


def test_the_recipe_offers_every_strategy_of_the_table_and_flower_takes_their_parameters():
    import flwr.serverapp.strategy

    assert set(STRATEGY_LIST) == set(STRATEGIES) and len(STRATEGY_LIST) >= 11
    for name, spec in STRATEGIES.items():
        takes = inspect.signature(getattr(flwr.serverapp.strategy, spec.flower).__init__).parameters
        assert set(spec.params) <= set(takes), name


def test_with_three_sites_a_trimmed_mean_below_a_third_trims_nothing():
    """What docs/multi-site-and-federated.md says of fedtrimmedavg with three sites."""
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    three = np.array([[0.0], [1.0], [5.0]])
    assert trim_mean(three, 0.33)[0] == pytest.approx(2.0) and trim_mean(three, 0.34)[0] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def three_sites(digits_manifest):
    from stagewise.data import load_images
    from stagewise.federated.site import SitePartition
    from stagewise.training.cache import ImageSet

    table = pd.read_csv(digits_manifest).head(36)
    x = load_images([str(digits_manifest.parent / p) for p in table["path"]], 32)
    y = torch.tensor(table[["outcome"]].to_numpy(), dtype=torch.float32)
    parts = []
    for k, site in enumerate(SITES):
        rows = np.arange(k, 36, 3)
        parts.append(SitePartition(site, ImageSet(x[torch.as_tensor(rows)], f"strategies:{site}"), y[torch.as_tensor(rows)],
                                   np.arange(len(rows)), np.arange(len(rows))))
    return parts


def arm(strategy: str, **params) -> ArmConfig:
    return ArmConfig.model_validate({
        "name": "f", "backbone": "scratch:tinycnn",
        "sites": {"mode": "federated", "strategy": strategy, "strategy_params": params},
        "stages": [{"kind": "probe", "epochs": 1, "batch_size": 8, "lr": 3e-3, "rounds": 1}]})


NON_DEFAULT = {"fedavgm": {"server_momentum": 0.9, "server_learning_rate": 0.5}, "fedtrimmedavg": {"beta": 0.34},
               "multikrum": {"num_nodes_to_select": 2}}
"""Parameters that change what the round gives, so that reaching Flower shows."""


def _sent_by_site(messages, key: str) -> list[np.ndarray]:
    """The tensor `key` each site sent up in the round, in site order."""
    up = sorted((m for d, m in messages if d == "up"), key=lambda m: int(m.content["metrics"]["partition"]))
    return [m.content["arrays"].to_torch_state_dict()[key].numpy() for m in up]


@pytest.mark.slow
def test_every_strategy_aggregates_a_round_in_the_simulation(three_sites):
    """One Flower simulation (its Ray start is most of the cost), whose ServerApp runs the
    round loop of `federated.rounds` once per strategy name over stagewise's ClientApp; the
    replies are audited on the wire and each aggregate checked against its method."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from stagewise.federated.client_app import make_client_app
    from stagewise.federated.rounds import AuditedGrid, FederatedResult, round_plan, serve_rounds
    from stagewise.federated.simulation import InMemorySite, simulation_backend
    from stagewise.federated.site import SiteTrainer
    from stagewise.models import Network, create_backbone
    from stagewise.training.compute import Compute

    torch.manual_seed(0)
    start = Network.build(create_backbone("scratch:tinycnn"), 1)
    compute = Compute(torch.device("cpu"), None, False, True, 64)
    arms = {name: arm(name, **NON_DEFAULT.get(name, {})) for name in STRATEGY_LIST}
    trainers = [SiteTrainer(p, arms["fedavg"], start, compute, seed=0) for p in three_sites]
    results, wire, errors = {}, {name: [] for name in arms}, []
    server = ServerApp()

    @server.main()
    def main(grid, context):
        try:
            for name, a in arms.items():
                results[name] = FederatedResult.starting_from(start)
                audited = AuditedGrid(grid, lambda d, m, name=name: wire[name].append((d, m)))
                serve_rounds(audited, a.sites, round_plan(a, start.group_names), start, results[name], len(SITES),
                             order=lambda m: int(m.content["metrics"]["partition"]))
        except BaseException as err:  # noqa: BLE001 - surfaced below, after the simulation ends
            errors.append(err)

    client = make_client_app(lambda context, config: InMemorySite(trainers, context, 1))
    run_simulation(server, client, num_supernodes=len(SITES), backend_config=simulation_backend(len(SITES)))
    assert not errors, errors
    head = [k for k in start.state_dict() if k.startswith("head.")]
    w0 = start.state_dict()[head[0]].numpy()
    for name in STRATEGY_LIST:
        (record,) = results[name].rounds
        assert record["sites_replied"] == 3 and record["trainable"] == ["head"], name
        state = results[name].global_state
        assert any(not torch.equal(state[k], start.state_dict()[k]) for k in head), name  # the update aggregated
        assert all(torch.equal(state[k], v) for k, v in start.state_dict().items() if k not in head), name
    sent = _sent_by_site(wire["fedavg"], head[0])
    assert all(np.array_equal(s, t) for s, t in zip(sent, _sent_by_site(wire["krum"], head[0])))  # same start and seeds
    got = {name: results[name].global_state[head[0]].numpy() for name in STRATEGY_LIST}
    mean, median = np.mean(sent, axis=0), np.median(sent, axis=0)  # equal-sized sites: FedAvg is the mean
    np.testing.assert_allclose(got["fedavg"], mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["fedprox"], mean, rtol=1e-5, atol=1e-7)  # mu = 0: FedAvg
    np.testing.assert_allclose(got["fedmedian"], median, rtol=1e-6)
    np.testing.assert_allclose(got["fedtrimmedavg"], median, rtol=1e-6)  # beta 0.34 of 3 trims one each side
    np.testing.assert_allclose(got["fedavgm"], w0 - 0.5 * (w0 - mean), rtol=1e-4, atol=1e-6)  # server lr 0.5
    assert any(np.array_equal(got["krum"], s) for s in sent)  # Krum picks one site's update as it is
    assert not any(np.allclose(got["multikrum"], s) for s in sent)  # MultiKrum averages two of them
    for name in ("fedadam", "fedyogi", "fedadagrad"):  # server-side optimizers step elsewhere than the mean
        assert not np.allclose(got[name], mean), name


@pytest.mark.parametrize("strategy", STRATEGY_LIST)
def test_a_parameter_a_strategy_does_not_take_is_refused_naming_it(strategy):
    from stagewise.federated.rounds import FederatedError, make_strategy

    data = {"name": "r", "cohort": {"manifest": "m.csv", "site": "hospital"},
            "arms": [arm(strategy).model_dump(mode="json")]}
    data["arms"][0]["sites"]["strategy_params"] = {"no_such_option": 1.0}
    with pytest.raises(RecipeError, match=rf"arms\.0\.sites \(arm .*\): strategy_params\.no_such_option: {strategy} has no"):
        recipe_from_dict(data)
    bad = SitesConfig.model_construct(strategy=strategy, strategy_params={"no_such_option": 1.0}, min_sites=None)
    with pytest.raises(FederatedError, match="no_such_option"):  # built without the recipe's check: still refused
        make_strategy(bad, 3)


@pytest.mark.parametrize("strategy, params, says", [
    ("fedtrimmedavg", {"beta": 0.5}, "strategy_params.beta: must be >= 0 and < 0.5"),
    ("krum", {"num_malicious_nodes": 0.5}, "strategy_params.num_malicious_nodes: must be a whole number"),
    ("fedadam", {"eta": 0.0}, "strategy_params.eta: must be > 0"),
    ("fedavgm", {"server_momentum": 1.0}, "strategy_params.server_momentum: must be >= 0 and < 1"),
    ("fedprox", {"proximal_mu": -0.1}, "strategy_params.proximal_mu: must be >= 0"),
])
def test_a_value_out_of_range_is_refused_naming_the_field(strategy, params, says):
    with pytest.raises(ValueError, match=says.replace(".", r"\.")):
        arm(strategy, **params)


def test_validate_refuses_a_robust_aggregator_with_too_few_sites_naming_the_field(digits_manifest, tmp_path):
    """Three hospitals: Krum with num_malicious_nodes 1 needs 5; MultiKrum with f = 0 works;
    secure aggregation needs 2 sites per round and no more shares than sites."""
    from stagewise.cli import app

    table = pd.read_csv(digits_manifest)
    table["path"] = [str(digits_manifest.parent / p) for p in table["path"]]
    table["hospital"] = table["patient"].map({p: "ABC"[i % 3] for i, p in enumerate(table["patient"].unique())})
    table.to_csv(tmp_path / "cohort.csv", index=False)

    def validate(sites: dict) -> tuple[int, str]:
        recipe = {"name": "t", "cohort": {"manifest": "cohort.csv", "site": "hospital"}, "data": {"image_size": 32},
                  "protocol": {"folds": 3, "repeats": 1},
                  "arms": [{"name": "fed", "backbone": "scratch:tinycnn", "sites": {"mode": "federated", **sites},
                            "stages": [{"kind": "probe", "epochs": 1, "rounds": 1}]}]}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        result = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml")])
        return result.exit_code, " ".join(result.output.split())

    code, said = validate({"strategy": "krum", "strategy_params": {"num_malicious_nodes": 1}})
    assert code == 2 and "arm 'fed'" in said and "strategy_params.num_malicious_nodes" in said, said
    assert "at least 5 sites" in said and "aggregate 3" in said, said
    code, said = validate({"strategy": "bulyan", "strategy_params": {"num_malicious_nodes": 0}, "min_sites": 2})
    assert code == 2 and "at least 3 sites" in said and "aggregate 2" in said, said  # a round may close with 2
    code, said = validate({"strategy": "multikrum", "strategy_params": {"num_nodes_to_select": 2}})
    assert code == 0 and "valid" in said, said
    # secure aggregation: a sum of one site's update is that update; no more shares than sites
    code, said = validate({"secure_aggregation": True, "min_sites": 1})
    assert code == 2 and "sites.secure_aggregation" in said and "at least 2 sites per round" in said, said
    code, said = validate({"secure_aggregation": {"num_shares": 5}})
    assert code == 2 and "secure_aggregation.num_shares is 5" in said and "only 3 sites" in said, said
    code, said = validate({"secure_aggregation": True, "strategy": "fedadam"})
    assert code == 0 and "valid" in said, said
