"""The network an arm starts from: its backbone with seeded random weights, and a fresh head
drawn from a fold's seed. Shared by pooled, local and federated training, so that every
mode (and every site of a federated job) starts from the same weights."""

from __future__ import annotations

import copy

import torch

from stagewise.models import Network, create_backbone
from stagewise.recipe import ArmConfig


def seeded_backbone(arm: ArmConfig, seed: int) -> torch.nn.Module:
    """The arm's starting backbone; random (scratch) weights depend on the recipe seed only,
    not on how much training ran before in this process, so a resumed run matches."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_backbone(**arm.backbone.model_dump())


def start_network(arm: ArmConfig, pristine: torch.nn.Module, n_outputs: int, seed: int) -> Network:
    """The network every site starts from: the same named weights and one shared head init."""
    torch.manual_seed(seed)
    return Network.build(copy.deepcopy(pristine), n_outputs, 0, arm.head.dropout, arm.head.hidden,
                         pretrained_head=arm.head.pretrained)
