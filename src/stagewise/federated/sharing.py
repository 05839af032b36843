"""Which tensors travel in a federated round, and how many bytes that is.

Only the groups that train in a round are sent and aggregated; frozen groups never leave a
site (every site starts from the same named weights, so they agree anyway). This is what
makes federated fine-tuning cheap: a probe round sends the head only. BatchNorm: with
`bn_stats: average` the running statistics of the trainable groups travel with their
weights; with `bn_stats: local` (FedBN) no BatchNorm tensor ever leaves a site. Groups named
in `sites.local_groups` (FedPer/FedRep: e.g. the head) never leave a site either: each site
trains its own, and the other groups are aggregated.

Every round names the digest of the coordinator's starting network (`START_SHA256`), and a
site checks its own against it before it trains: a site whose starting weights differ (another
pretrained weights file, other library versions) is refused, where it would otherwise have
trained the shared groups on top of frozen layers the coordinator does not have. So a
trainable group's tensors that no round has aggregated yet, still the starting weights (the
layers a thaw stage unfreezes, in its first round), travel as their names (`FROM_START`), not
as bytes: the site takes its own copies.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn

from stagewise.models import Network

START_SHA256 = "start-sha256"
"""Config entry of a round: the digest (`state_digest`) of the coordinator's starting network."""
FROM_START = "from-start"
"""Config entry of a round: the shared tensors (comma-separated names) the site takes from its
own starting weights instead of the message."""

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)  # noqa: SLF001 - the common base of BatchNorm1d/2d/3d


def group_keys(net: Network) -> "OrderedDict[str, list[tuple[str, bool]]]":
    """Group -> its state-dict keys, each with a flag `is_batchnorm`, in state-dict order.

    Parameters come from the group's parameter list (so timm groups given by parameter
    names work too); buffers from the group's modules. `num_batches_tracked` counters are
    left out: they are integers that averaging would corrupt and evaluation never reads.
    """
    names = {id(t): k for k, t in net.state_dict(keep_vars=True).items()}
    bn_tensors = {id(t) for m in net.modules() if isinstance(m, BN_TYPES) for t in [*m.parameters(), *m.buffers()]}
    out: "OrderedDict[str, list[tuple[str, bool]]]" = OrderedDict()
    for group, params in net.group_parameters().items():
        modules = [net.head] if group == "head" else net.backbone.group_modules(group)
        tensors = [*params, *(b for m in modules for n, b in m.named_buffers() if not n.endswith("num_batches_tracked"))]
        keys, seen = [], set()
        for t in tensors:
            if id(t) in names and id(t) not in seen:
                seen.add(id(t))
                keys.append((names[id(t)], id(t) in bn_tensors))
        out[group] = keys
    return out


def shared_keys(net: Network, trainable: list[str], bn_stats: str, local_groups=()) -> list[str]:
    """State-dict keys sent (and aggregated) in a round in which `trainable` groups train;
    `local_groups` (FedPer/FedRep) never travel, whether they train or not."""
    keys = group_keys(net)
    return [k for g in trainable if g not in local_groups for k, is_bn in keys[g] if bn_stats == "average" or not is_bn]


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of tensors (names, dtypes, shapes and values, in order): equal exactly when the
    two ends hold bit-identical tensors, whatever their memory layout or device."""
    h = hashlib.sha256()
    for k, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def from_start_of(config) -> tuple[list[str], str] | None:
    """(the round's tensors the site takes from its own starting weights, the digest of the
    coordinator's starting network), or None for a round that names no starting network."""
    if START_SHA256 not in config:
        return None
    names = str(config.get(FROM_START, "") or "")
    return (names.split(",") if names else [], str(config[START_SHA256]))
