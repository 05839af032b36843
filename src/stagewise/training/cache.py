"""Reuse of frozen computation: a frozen, un-augmented backbone prefix is computed once.

When the first k layer groups are frozen, in eval mode (BatchNorm statistics fixed) and
see no random augmentation, their output is a fixed function of the image. It is computed
once for every image of the cohort and reused across epochs, folds and arms. The key is a
hash of the prefix's exact weights and buffers, so an entry can never be served for
weights that have changed (after a thaw or a BatchNorm `adapt` stage), and arms that start
from the same pretrained weights share entries without being told to.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from stagewise.data import Cohort, load_images
from stagewise.models.heads import Network
from stagewise.recipe import Recipe
from stagewise.training.compute import Compute


@dataclass(frozen=True)
class ImageSet:
    """All images of a cohort, preprocessed: (N, 1, S, S) in [0, 1], with an identity key."""

    x: torch.Tensor
    key: str

    def __len__(self) -> int:
        return self.x.shape[0]


def _hash_modules(modules) -> str:
    h = hashlib.blake2b(digest_size=16)
    for m in modules:
        for name, t in m.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# Keyed by the group's first module itself (weakly), so a freed module's id can never alias.
_memo: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _group_hash(modules) -> str:
    """Hash of a group's weights and buffers, recomputed only when a tensor was modified:
    every in-place change (an optimizer step, a BatchNorm update) bumps a tensor's version."""
    tensors = [t for m in modules for t in m.state_dict(keep_vars=True).values()]
    versions = tuple((id(t), t.data_ptr(), t._version) for t in tensors)
    if not modules:
        return _hash_modules(modules)
    hit = _memo.get(modules[0])
    if hit is not None and hit[0] == versions:
        return hit[1]
    digest = _hash_modules(modules)
    _memo[modules[0]] = (versions, digest)
    return digest


def prefix_fingerprints(net: Network, upto: int | None = None) -> list[str]:
    """fp[k-1] identifies the weights of backbone groups 0..k-1 (cumulative), for k <= upto."""
    names = net.backbone.group_names
    if not net.backbone.sequential:
        # Parameters outside the listed modules (a ViT's pos_embed) count for the whole trunk.
        whole = _group_hash([net.backbone.net])
        return [whole] * len(names)
    out, acc = [], hashlib.blake2b(digest_size=16)
    for g in names[: len(names) if upto is None else upto]:
        acc.update(_group_hash(net.backbone.group_modules(g)).encode())
        out.append(acc.copy().hexdigest())
    return out


def resumable_depths(net: Network) -> list[int]:
    """Prefix depths this backbone can resume from: any for sequential ones, else whole."""
    n = len(net.backbone.group_names)
    return list(range(1, n + 1)) if net.backbone.sequential else [n]


class PrefixCache:
    """Prefix outputs for every image, least recently used first out beyond `max_bytes`."""

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = max_bytes
        self._store: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _key(self, images: ImageSet, k: int, fingerprint: str, compute: Compute, maps: bool = False) -> tuple:
        return (images.key, k, fingerprint, compute.label) + (("maps",) if maps else ())

    def get(self, net: Network, k: int, images: ImageSet, compute: Compute, maps: bool = False) -> torch.Tensor:
        """Outputs of the first k groups (eval mode) for all images, computed at most once.
        After the last group they are the pooled features, unless `maps` asks for the
        feature maps before pooling (for augmentation on them)."""
        if k not in resumable_depths(net):
            raise ValueError(f"cannot resume {net.backbone.arch} after {k} groups")
        maps = maps and k == len(net.backbone.group_names)  # before the last group, outputs are maps anyway
        key = self._key(images, k, prefix_fingerprints(net, upto=k)[k - 1], compute, maps)
        if key in self._store:
            self.hits += 1
            self._store.move_to_end(key)
            return self._store[key]
        self.misses += 1
        out = self._compute(net, k, images, compute, maps)
        self._store[key] = out
        while sum(t.numel() * t.element_size() for t in self._store.values()) > self.max_bytes and len(self._store) > 1:
            self._store.popitem(last=False)
        return out

    def deepest_cached(self, net: Network, images: ImageSet, compute: Compute) -> int:
        """The largest k with a stored entry for the current weights, 0 if none."""
        fps = prefix_fingerprints(net)
        for k in sorted(resumable_depths(net), reverse=True):
            if self._key(images, k, fps[k - 1], compute) in self._store:
                return k
        return 0

    def _resume_point(self, net: Network, k: int, images: ImageSet, compute: Compute, maps: bool):
        """The deepest stored entry below depth k for the same weights (or the last group's
        maps, when pooled features are asked for), to continue from instead of the images:
        (depth, outputs), or (0, None)."""
        n = len(net.backbone.group_names)
        fps = prefix_fingerprints(net, upto=k)
        if k == n and not maps:
            stored = self._store.get(self._key(images, n, fps[n - 1], compute, maps=True))
            if stored is not None:
                return n, stored
        for j in sorted((d for d in resumable_depths(net) if d < k), reverse=True):
            stored = self._store.get(self._key(images, j, fps[j - 1], compute))
            if stored is not None:
                return j, stored
        return 0, None

    @torch.no_grad()
    def _compute(self, net: Network, k: int, images: ImageSet, compute: Compute, maps: bool) -> torch.Tensor:
        backbone = net.backbone
        was_training = [m.training for m in backbone.modules()]
        backbone.eval()
        stop = None if k == len(backbone.group_names) and not maps else k
        start, source = self._resume_point(net, k, images, compute, maps)
        source = images.x if source is None else source
        chunks = []
        try:
            for i in range(0, len(images), compute.eval_batch_size):
                xb = compute.to_input(source[i : i + compute.eval_batch_size])
                with compute.autocast():
                    chunks.append(backbone(xb, start=start, stop=stop))
        finally:
            for m, t in zip(backbone.modules(), was_training):
                m.training = t
        return torch.cat(chunks)


def image_key(cohort: Cohort, size: int, resize: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in cohort.table["path"]:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(f"{size}|{resize}".encode())
    return h.hexdigest()


def load_image_set(recipe: Recipe, cohort: Cohort) -> ImageSet:
    t = cohort.table
    x = load_images(t["path"].tolist(), recipe.data.image_size, recipe.data.resize, rows=t["row"].tolist())
    return ImageSet(x, image_key(cohort, recipe.data.image_size, recipe.data.resize))
