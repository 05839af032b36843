"""Stages: what trains, what stays frozen, at which learning rates, with which BatchNorm policy."""

import numpy as np
import pytest
import torch

from stagewise.models import Network, build_arch
from stagewise.recipe import ComputeConfig, FinetuneStage, MixConfig, ProbeStage, ThawStage
from stagewise.training.augment import cutmix
from stagewise.training.cache import ImageSet, PrefixCache
from stagewise.training.compute import resolve_compute
from stagewise.training.engine import StageError, fit_stage, plan_stage, predict

FP32 = resolve_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False))


def _data(n=24, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g).half()
    y = (torch.arange(n) % 2).float().unsqueeze(1)
    x[y[:, 0] == 1, :, :8, :8] = 1.0  # a learnable signal
    return ImageSet(x, key=f"synthetic{seed}"), y


def _net(seed=0):
    torch.manual_seed(seed)
    return Network.build(build_arch("scratch:resnet18"), dropout=0.0)


def _snapshot(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def _changed(before, net, prefix):
    return [not torch.equal(before[n], p) for n, p in net.named_parameters() if n.startswith(prefix)]


def test_thaw_keeps_frozen_groups_bit_identical_and_trains_the_rest():
    images, y = _data()
    net = _net()
    before = _snapshot(net)
    stage = ThawStage(epochs=4, batch_size=8, unfreeze={"layer4": 0.0, "layer3": 0.5},
                        lr={"head": 1e-2, "layer4": 5e-3, "layer3": 2.5e-3}, weight_decay=1e-2, bn="adapt")
    fit_stage(net, stage, images, np.arange(20), y, FP32, PrefixCache(), seed=1)
    for frozen in ("backbone.net.conv1", "backbone.net.bn1", "backbone.net.layer1", "backbone.net.layer2"):
        assert not any(_changed(before, net, frozen)), frozen
    for trained in ("backbone.net.layer3", "backbone.net.layer4", "head"):
        assert all(_changed(before, net, trained + ".")), trained


def test_probe_trains_only_the_head():
    images, y = _data()
    net = _net()
    before = _snapshot(net)
    fit_stage(net, ProbeStage(epochs=2, batch_size=8), images, np.arange(20), y, FP32, PrefixCache(), seed=0)
    assert not any(_changed(before, net, "backbone."))
    assert all(_changed(before, net, "head."))


def test_learning_rates_per_group_follow_the_recipe_at_each_epoch():
    images, y = _data()
    net = _net()
    lrs = {"head": 1e-3, "layer4": 5e-4, "layer3": 2.5e-4, "layer2": 1e-4}
    stage = ThawStage(epochs=10, batch_size=8, lr=lrs,
                        unfreeze={"layer4": 0.1, "layer3": 0.3, "layer2": 0.6})
    log = fit_stage(net, stage, images, np.arange(20), y, FP32, None, seed=0)
    starts = {"head": 0, "layer4": 1, "layer3": 3, "layer2": 6}
    for entry in log.epochs:
        assert entry["lr"] == lrs  # constant schedule: exactly the recipe's values
        expected = {g for g, e in starts.items() if entry["epoch"] >= e}
        assert set(entry["trainable"]) == expected
    # stem and layer1 are never in the optimizer
    assert set(log.epochs[-1]["lr"]) == set(lrs)


def test_onecycle_peaks_at_each_groups_recipe_lr():
    images, y = _data()
    net = _net()
    lrs = {"head": 1e-3, "layer4": 5e-4}
    stage = ThawStage(epochs=10, batch_size=8, lr=lrs, unfreeze={"layer4": 0.1},
                        schedule="onecycle", pct_start=0.3)
    log = fit_stage(net, stage, images, np.arange(20), y, FP32, None, seed=0)
    for g, peak in lrs.items():
        seen = [e["lr"][g] for e in log.epochs]
        assert max(seen) == pytest.approx(peak, rel=0.05)
        assert seen[0] == pytest.approx(peak / 25)  # OneCycle starts at max_lr / div_factor


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_a_schedule_in_parts_runs_the_whole_schedule_one_part_after_another(schedule):
    """`sites.lr_schedule: across_rounds`: round i of a stage's n rounds starts where round i-1's
    learning rates ended, so n rounds of 2 epochs follow the LRs of one 2n-epoch schedule;
    without it each round runs (and restarts) the whole schedule."""
    images, y = _data(n=20)

    def epoch_lrs(epochs, part):
        stage = ThawStage(epochs=epochs, batch_size=8, lr={"head": 1e-3, "layer4": 5e-4}, unfreeze={"layer4": 0.0},
                          schedule=schedule)
        log = fit_stage(_net(), stage, images, np.arange(20), y, FP32, None, seed=0, schedule_part=part)
        return [e["lr"] for e in log.epochs]

    whole = epoch_lrs(6, (0, 1))
    in_parts = [lrs for i in range(3) for lrs in epoch_lrs(2, (i, 3))]
    assert len(in_parts) == len(whole) == 6
    for got, want in zip(in_parts, whole):
        assert got == pytest.approx(want, rel=1e-9)
    restarted = epoch_lrs(2, (0, 1)) * 3
    assert restarted[2]["head"] != pytest.approx(whole[2]["head"], rel=1e-3)
    with pytest.raises(ValueError, match="part 3 of 3"):
        epoch_lrs(2, (3, 3))


def test_lr_decay_gives_discriminative_rates_down_from_the_head():
    stage = FinetuneStage(lr=1e-3, lr_decay=0.5)
    plan = plan_stage(stage, ["stem", "layer1", "layer2", "head"])
    assert plan.lrs == {"head": 1e-3, "layer2": 5e-4, "layer1": 2.5e-4, "stem": 1.25e-4}


def test_unknown_group_name_is_a_clear_error():
    stage = ThawStage(unfreeze={"layer9": 0.1})
    with pytest.raises(StageError, match="layer9.*groups are"):
        plan_stage(stage, ["stem", "layer1", "head"])


def _bn_stats(net, group):
    return [b.clone() for m in net.backbone.group_modules(group) for n, b in m.named_buffers() if "running" in n]


@pytest.mark.parametrize("policy", ["freeze", "adapt"])
def test_bn_policy_for_frozen_groups(policy):
    images, y = _data()
    net = _net()
    before = _bn_stats(net, "layer2")
    stage = ThawStage(epochs=1, batch_size=8, unfreeze={"layer4": 0.0}, bn=policy, lr=1e-3)
    fit_stage(net, stage, images, np.arange(20), y, FP32, None, seed=0)
    after = _bn_stats(net, "layer2")
    same = all(torch.equal(a, b) for a, b in zip(before, after))
    assert same == (policy == "freeze")


def test_reuse_of_frozen_prefix_gives_the_same_model_as_recomputing():
    images, y = _data()
    stage = ThawStage(epochs=3, batch_size=8, unfreeze={"layer4": 0.0}, lr=1e-3)
    nets = []
    for cache in (PrefixCache(), None):
        net = _net()
        fit_stage(net, stage, images, np.arange(20), y, FP32, cache, seed=0)
        nets.append(net)
    for (n, a), (_, b) in zip(nets[0].named_parameters(), nets[1].named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


def test_prefix_cache_is_reused_across_folds_and_invalidated_by_training():
    images, y = _data()
    cache = PrefixCache()
    probe = ProbeStage(epochs=2, batch_size=8)
    for fold in range(2):
        fit_stage(_net(), probe, images, np.arange(fold, 20), y, FP32, cache, seed=fold)
    assert cache.misses == 1 and cache.hits >= 3  # one trunk pass serves both folds' epochs
    net = _net()
    fit_stage(net, FinetuneStage(epochs=1, batch_size=8), images, np.arange(20), y, FP32, cache, seed=0)
    assert cache.deepest_cached(net, images, FP32) == 0  # trained weights never match old entries


def test_predict_from_cache_equals_predict_from_images():
    images, y = _data()
    net = _net()
    cache = PrefixCache()
    fit_stage(net, ProbeStage(epochs=1, batch_size=8), images, np.arange(20), y, FP32, cache, seed=0)
    idx = np.arange(20, 24)
    np.testing.assert_allclose(predict(net, images, idx, FP32, cache), predict(net, images, idx, FP32, None), atol=1e-5)


def test_cutmix_lambda_is_the_kept_box_area():
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(4, 1, 16, 16)
    x[1::2] = 1.0
    y = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    mixed, ymix, lam = cutmix(x, y, MixConfig(alpha=1.0, p=1.0), g)
    pasted = (mixed != x).float().mean(dim=(1, 2, 3))
    for i in range(4):
        if pasted[i] > 0:  # a partner of the other class: the pasted fraction is exactly 1 - lam
            assert float(pasted[i]) == pytest.approx(1 - lam)
            assert float(ymix[i]) == pytest.approx(lam * float(y[i]) + (1 - lam) * (1 - float(y[i])))


def test_same_seed_same_model():
    images, y = _data()
    stage = FinetuneStage(epochs=2, batch_size=8, augment={"flip": True, "rotate": 10, "intensity": 0.1},
                        cutmix=MixConfig(alpha=1.0, p=0.5), balanced_sampling=True)
    nets = []
    for _ in range(2):
        net = _net()
        fit_stage(net, stage, images, np.arange(20), y, FP32, None, seed=7)
        nets.append(net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
