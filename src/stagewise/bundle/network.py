"""The network inside a bundle: one backbone pass feeding every exported arm's head
(`SharedHeads`), and the heads' file (`heads.safetensors`: weights plus the metadata that
rebuilds each head; nothing in it is ever unpickled)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stagewise.models import Backbone, Head
from stagewise.recipe import HeadConfig


class SharedHeads(torch.nn.Module):
    """One backbone pass, K heads: [0, 1] one-channel images in, (N, K) probabilities out.

    Arms that froze the same backbone (probe stages on one pretrained trunk) differ only in
    their heads, so a bundle of them computes the trunk once per image for all tasks.
    """

    def __init__(self, backbone: Backbone, heads: dict[str, torch.nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.heads = torch.nn.ModuleDict(heads)

    def forward(self, x):
        features = self.backbone(x)
        return torch.cat([torch.sigmoid(h(features)) for h in self.heads.values()], dim=1)


def save_heads(heads: dict[str, torch.nn.Module], configs: dict[str, HeadConfig], path: Path) -> None:
    from safetensors.torch import save_file

    state = {f"{arm}.{k}": v.detach().cpu().contiguous() for arm, h in heads.items() for k, v in h.state_dict().items()}
    meta = {"heads": json.dumps([
        {"arm": arm, "head": configs[arm].model_dump(), "in_features": h.layers[-1].in_features if not configs[arm].hidden
         else h.layers[1].in_features, "n_outputs": h.layers[-1].out_features} for arm, h in heads.items()
    ])}
    save_file(state, str(path), metadata=meta)


def load_heads(path: Path) -> dict[str, Head]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        specs = json.loads(f.metadata()["heads"])
    state = load_file(str(path))
    heads = {}
    for spec in specs:
        cfg = HeadConfig.model_validate(spec["head"])
        head = Head(spec["in_features"], spec["n_outputs"], cfg.dropout, cfg.hidden)
        prefix = spec["arm"] + "."
        head.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        heads[spec["arm"]] = head.eval()
    return heads
