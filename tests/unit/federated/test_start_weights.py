"""Every round names the digest of the coordinator's starting network, which a site checks its
own against; tensors still at the starting weights travel as names only: the site takes its own
copies and trains exactly as if they had been sent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stagewise.federated.job import FederatedError
from stagewise.federated.sharing import FROM_START, START_SHA256, from_start_of, shared_keys, state_digest
from stagewise.federated.site import SitePartition, SiteTrainer
from stagewise.models import Network, create_backbone
from stagewise.recipe import ArmConfig
from stagewise.training.cache import ImageSet
from stagewise.training.compute import Compute

ARM = ArmConfig.model_validate({"name": "f", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
                                "stages": [{"kind": "probe", "rounds": 1, "epochs": 1, "batch_size": 4},
                                           {"kind": "thaw", "rounds": 1, "epochs": 1, "batch_size": 4,
                                            "unfreeze": {"block3": 0.0}}]})
CPU = Compute(torch.device("cpu"), None, False, True, 64)


def _net(seed: int = 0) -> Network:
    torch.manual_seed(seed)
    return Network.build(create_backbone("scratch:tinycnn"), 1)


def _trainer(start: Network, site: str = "A") -> SiteTrainer:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 32, 32, generator=g)  # one-channel images, as the image loader gives them
    y = torch.tensor([[0.0], [1.0]] * 4)
    part = SitePartition(site, ImageSet(x, f"unit:{site}"), y, np.arange(8), np.arange(8))
    return SiteTrainer(part, ARM, start, CPU, seed=0)


def _thaw_keys(net: Network) -> tuple[list[str], list[str]]:
    """(the thaw round's shared keys, those of them outside the head: never aggregated before it)."""
    keys = shared_keys(net, [g for g in net.group_names if g in ("block3", "head")], "average")
    return keys, [k for k in keys if not k.startswith("head.")]


def test_the_digest_is_of_the_values_not_their_layout():
    x = torch.randn(2, 3, 4, 4)
    assert state_digest({"w": x}) == state_digest({"w": x.to(memory_format=torch.channels_last)})
    nudged = x.clone()
    nudged.view(-1)[5] = torch.nextafter(nudged.view(-1)[5], torch.tensor(np.inf))
    assert state_digest({"w": x}) != state_digest({"w": nudged})  # one ulp
    assert state_digest({"w": x}) != state_digest({"v": x})  # the names count
    assert state_digest({"w": x.half()}) != state_digest({"w": x})


def test_held_tensors_train_exactly_as_sent_ones():
    start = _net()
    assert "block3" in start.group_names
    keys, held = _thaw_keys(start)
    assert held
    state = start.state_dict()
    head = {k: state[k].clone() + 0.01 for k in keys if k not in held}  # the probe's aggregate
    full = {k: (head[k] if k in head else state[k].clone()) for k in keys}
    config = {FROM_START: ",".join(held), START_SHA256: state_digest(state)}
    assert from_start_of(config) == (held, config[START_SHA256]) and from_start_of({}) is None
    assert from_start_of({START_SHA256: "x"}) == ([], "x")
    sent_a, state_a, *_ = _trainer(start).train_round(full, None, 1, 0, ["block3", "head"])
    sent_b, state_b, *_ = _trainer(start).train_round(head, None, 1, 0, ["block3", "head"],
                                                      from_start=from_start_of(config))
    assert list(sent_b) == list(sent_a) == keys  # sent back in the coordinator's order, held ones included
    assert all(torch.equal(sent_a[k], sent_b[k]) for k in keys)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(sent_b[held[0]], state[held[0]])  # and trained


def test_a_site_whose_starting_network_differs_is_refused_even_in_a_frozen_layer():
    ours = _net(0)
    theirs = _net(0)
    with torch.no_grad():  # one value of the stem, which never trains nor travels
        next(iter(theirs.backbone.group_modules("stem")[0].parameters())).view(-1)[0] += 1e-6
    _, held = _thaw_keys(ours)
    site = _trainer(ours, "B")
    with pytest.raises(FederatedError, match=r"site B: its starting network differs from the coordinator's; use the "
                                             r"same pretrained weights file") as refused:
        site.with_start({}, ([], state_digest(theirs.state_dict())))
    # whole in the coordinator's round error, which keeps 200 characters of Flower's "<class ...>:<'...'>"
    assert len(f"{type(refused.value)}:<'{refused.value}'>") <= 200
    digest = state_digest(ours.state_dict())
    assert set(site.with_start({}, (held, digest))) == set(held)
    with pytest.raises(FederatedError, match="no.such"):
        site.with_start({}, (["no.such"], digest))
