"""Every Flower strategy name the recipe accepts aggregates one real round in Flower's
simulation engine (two sites, a probe round), and each refuses a parameter it does not take
before anything trains, naming the field."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pandas as pd
import pytest
import torch

from stagewise.recipe import ArmConfig, SitesConfig

pytestmark = pytest.mark.flower  # its Flower simulations share one Ray instance (conftest)

STRATEGIES = get_args(SitesConfig.model_fields["strategy"].annotation)


@pytest.fixture(scope="module")
def two_sites(digits_manifest):
    from stagewise.data import load_images
    from stagewise.federated.site import SitePartition
    from stagewise.training.cache import ImageSet

    table = pd.read_csv(digits_manifest).head(32)
    x = load_images([str(digits_manifest.parent / p) for p in table["path"]], 32)
    y = torch.tensor(table[["outcome"]].to_numpy(), dtype=torch.float32)
    parts = []
    for site, rows in (("A", np.arange(0, 32, 2)), ("B", np.arange(1, 32, 2))):
        parts.append(SitePartition(site, ImageSet(x[torch.as_tensor(rows)], f"strategies:{site}"), y[torch.as_tensor(rows)],
                                   np.arange(len(rows)), np.arange(len(rows))))
    return parts


def arm(strategy: str, **params) -> ArmConfig:
    return ArmConfig.model_validate({
        "name": "f", "backbone": "scratch:tinycnn",
        "sites": {"mode": "federated", "strategy": strategy, "strategy_params": params},
        "stages": [{"kind": "probe", "epochs": 1, "batch_size": 8, "lr": 3e-3, "rounds": 1}]})


@pytest.mark.slow
def test_every_strategy_aggregates_a_round_in_the_simulation(two_sites):
    """One Flower simulation (its Ray start is most of the cost), whose ServerApp runs the
    round loop of `federated.rounds` once per strategy name over stagewise's ClientApp."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from stagewise.federated.client_app import make_client_app
    from stagewise.federated.rounds import FederatedResult, round_plan, serve_rounds
    from stagewise.federated.simulation import InMemorySite, simulation_backend
    from stagewise.federated.site import SiteTrainer
    from stagewise.models import Network, create_backbone
    from stagewise.training.compute import Compute

    torch.manual_seed(0)
    start = Network.build(create_backbone("scratch:tinycnn"), 1)
    compute = Compute(torch.device("cpu"), None, False, True, 64)
    arms = {name: arm(name) for name in STRATEGIES}
    trainers = [SiteTrainer(p, arms["fedavg"], start, compute, seed=0) for p in two_sites]
    results, errors = {}, []
    server = ServerApp()

    @server.main()
    def main(grid, context):
        try:
            for name, a in arms.items():
                results[name] = FederatedResult.starting_from(start)
                serve_rounds(grid, a.sites, round_plan(a, start.group_names), start, results[name], 2,
                             order=lambda m: int(m.content["metrics"]["partition"]))
        except BaseException as err:  # noqa: BLE001 - surfaced below, after the simulation ends
            errors.append(err)

    client = make_client_app(lambda context, config: InMemorySite(trainers, context, 1))
    run_simulation(server, client, num_supernodes=2, backend_config=simulation_backend(2))
    assert not errors, errors
    head = [k for k in start.state_dict() if k.startswith("head.")]
    for name in STRATEGIES:
        (record,) = results[name].rounds
        assert record["sites_replied"] == 2 and record["trainable"] == ["head"], name
        state = results[name].global_state
        assert any(not torch.equal(state[k], start.state_dict()[k]) for k in head), name  # the update aggregated
        assert all(torch.equal(state[k], v) for k, v in start.state_dict().items() if k not in head), name
    # FedAvg of two equal-sized sites is their mean; the server-side optimizer of FedAdam moves elsewhere
    assert not torch.equal(results["fedavg"].global_state[head[0]], results["fedadam"].global_state[head[0]])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_parameter_a_strategy_does_not_take_is_refused_naming_it(strategy):
    from stagewise.federated.rounds import FederatedError, make_strategy

    with pytest.raises(FederatedError, match=rf"strategy_params for {strategy}.*no_such_option"):
        make_strategy(arm(strategy, no_such_option=1.0).sites, 2)
