"""Frozen-prefix reuse under the BPD protocol's settings: `bn: adapt_once` (AdaBN once per
stage, then fixed) and `augment_on: features` (augmentation and CutMix on the cached output of
the frozen groups)."""

import numpy as np
import pytest
import torch

from stagewise.models import Network, build_arch
from stagewise.recipe import AugmentConfig, ComputeConfig, MixConfig, ProbeStage, RecipeError, ThawStage, parse_stage
from stagewise.training.cache import ImageSet, PrefixCache
from stagewise.training.compute import resolve_compute
from stagewise.training.engine import fit_stage, predict

FP32 = resolve_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False))
FLIP_CUTMIX = {"augment": AugmentConfig(flip=True, rotate=5, crop={"scale": [0.9, 1.0]}),
               "cutmix": MixConfig(alpha=1.0, p=0.5)}


def _data(n=24, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g).half()
    y = (torch.arange(n) % 2).float().unsqueeze(1)
    x[y[:, 0] == 1, :, :8, :8] = 1.0
    return ImageSet(x, key=f"synthetic{seed}"), y


def _net(seed=0):
    torch.manual_seed(seed)
    return Network.build(build_arch("scratch:resnet18"), dropout=0.0)


def _weights(net):
    return {n: p.detach().clone() for n, p in net.named_parameters() if n.startswith("backbone.")}


def test_adapt_once_reestimates_frozen_batchnorm_on_training_rows_only_then_reuses_the_prefix():
    images, y = _data()
    train = np.arange(16)
    net = _net()
    weights = _weights(net)
    cache = PrefixCache()
    log = fit_stage(net, ProbeStage(epochs=3, batch_size=8, bn="adapt_once"), images, train, y, FP32, cache, seed=0)
    assert log.adapted_batchnorm == 20  # every BatchNorm of ResNet-18's backbone (probe: all groups frozen)
    assert all(torch.equal(weights[n], p) for n, p in net.named_parameters() if n.startswith("backbone."))
    # bn1 sees conv1's output; one estimation batch holds all 16 training rows, so its running
    # mean is exactly their per-channel mean (update_bn's cumulative average over one batch)
    with torch.no_grad():
        conv = net.backbone.net.conv1(net.backbone.prepare(images.x[torch.as_tensor(train)]))
    assert torch.allclose(net.backbone.net.bn1.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5)
    assert [e["resumed_after_groups"] for e in log.epochs] == [5, 5, 5]
    assert cache.misses == 1 and cache.hits == 2  # computed once for the stage, reused every epoch
    # the test rows never move the statistics
    other = ImageSet(images.x.clone(), "other")
    other.x[16:] = torch.rand(8, 1, 32, 32).half()
    net2 = _net()
    fit_stage(net2, ProbeStage(epochs=3, batch_size=8, bn="adapt_once"), other, train, y, FP32, PrefixCache(), seed=0)
    assert torch.equal(net.backbone.net.bn1.running_var, net2.backbone.net.bn1.running_var)
    assert torch.allclose(torch.as_tensor(predict(net, images, train, FP32, cache)),
                          torch.as_tensor(predict(net2, other, train, FP32, None)), atol=1e-5)


def test_adapt_once_changes_the_statistics_that_freeze_keeps():
    images, y = _data()
    frozen, adapted = _net(), _net()
    fit_stage(frozen, ProbeStage(epochs=1, batch_size=8), images, np.arange(16), y, FP32, None, seed=0)
    fit_stage(adapted, ProbeStage(epochs=1, batch_size=8, bn="adapt_once"), images, np.arange(16), y, FP32, None, seed=0)
    assert torch.equal(frozen.backbone.net.bn1.running_mean, torch.zeros(64))  # a fresh network's, untouched
    assert not torch.equal(adapted.backbone.net.bn1.running_mean, torch.zeros(64))


def test_augment_on_features_computes_the_frozen_prefix_once_and_matches_no_cache():
    images, y = _data()
    stage = ProbeStage(epochs=3, batch_size=8, augment_on="features", **FLIP_CUTMIX)
    cached, direct = _net(), _net()
    cache = PrefixCache()
    log = fit_stage(cached, stage, images, np.arange(20), y, FP32, cache, seed=3)
    log_direct = fit_stage(direct, stage, images, np.arange(20), y, FP32, None, seed=3)
    assert cache.misses == 1 and cache.hits == 2
    assert all(e["resumed_after_groups"] == 5 and e["augmented"] == "features" for e in log.epochs)
    # the cache is only a shortcut: the same draws on the same feature maps
    for a, b in zip(cached.head.parameters(), direct.head.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert [round(e["loss"], 5) for e in log.epochs] == [round(e["loss"], 5) for e in log_direct.epochs]
    # and the augmentation did something: without it the head ends elsewhere
    plain = _net()
    fit_stage(plain, ProbeStage(epochs=3, batch_size=8), images, np.arange(20), y, FP32, None, seed=3)
    assert not torch.allclose(plain.head.layers[-1].weight, cached.head.layers[-1].weight, atol=1e-4)


def test_augment_on_images_still_recomputes_every_batch():
    images, y = _data()
    cache = PrefixCache()
    log = fit_stage(_net(), ProbeStage(epochs=2, batch_size=8, **FLIP_CUTMIX), images, np.arange(20), y, FP32, cache,
                    seed=0)
    assert cache.misses == 0 and all(e["resumed_after_groups"] == 0 and e["augmented"] == "images" for e in log.epochs)


def test_thaw_on_features_resumes_from_the_deepest_frozen_group_each_epoch():
    images, y = _data()
    net = _net()
    weights = _weights(net)
    stage = ThawStage(epochs=4, batch_size=8, unfreeze={"layer4": 0.25, "layer3": 0.5}, bn="adapt_once",
                      lr={"head": 1e-2, "layer4": 5e-3, "layer3": 2.5e-3}, augment_on="features", **FLIP_CUTMIX)
    log = fit_stage(net, stage, images, np.arange(20), y, FP32, PrefixCache(), seed=1)
    assert [e["resumed_after_groups"] for e in log.epochs] == [5, 4, 3, 3]
    for frozen in ("backbone.net.conv1.", "backbone.net.layer1.", "backbone.net.layer2."):
        assert all(torch.equal(weights[n], p) for n, p in net.named_parameters() if n.startswith(frozen)), frozen
    assert all(not torch.equal(weights[n], p) for n, p in net.named_parameters() if n.startswith("backbone.net.layer3."))


@pytest.mark.parametrize("stage, message", [
    ({"kind": "probe", "augment_on": "features", "augment": {"blur": {}}}, "augment.blur"),
    ({"kind": "probe", "augment_on": "features", "augment": {"intensity": 0.1}}, "augment.intensity"),
    ({"kind": "probe", "augment_on": "features", "bn": "adapt"}, "bn: adapt_once"),
    ({"kind": "probe", "bn": "adapt_twice"}, "adapt_once"),
])
def test_recipe_refuses_augmentation_on_features_that_cannot_be_done(stage, message):
    with pytest.raises(RecipeError, match=message):
        parse_stage(stage)


def test_deeper_prefix_continues_from_a_stored_shallower_one_with_the_same_outputs():
    images, y = _data()
    net = _net()
    shared, fresh = PrefixCache(), PrefixCache()
    shallow = shared.get(net, 2, images, FP32)
    calls = []
    hook = net.backbone.net.layer1.register_forward_hook(lambda *a: calls.append(1))
    deep = shared.get(net, 4, images, FP32)
    assert not calls  # layer1 (group 2) did not run again: continued from the stored depth-2 output
    hook.remove()
    assert torch.allclose(deep, fresh.get(net, 4, images, FP32), atol=1e-6)
    assert torch.equal(shallow, fresh.get(net, 2, images, FP32))
    # pooled features from the stored last-group maps (what predict asks for after augment_on: features)
    maps = shared.get(net, 5, images, FP32, maps=True)
    assert maps.dim() == 4
    assert torch.allclose(shared.get(net, 5, images, FP32), fresh.get(net, 5, images, FP32), atol=1e-6)
