"""DP-SGD at a site (`sites.privacy`): per-image clipping as Opacus does it inside the
training loop, the accountant against Opacus' own published numbers, the non-DP loop
recovered without noise and clipping, and the refusals of what per-image clipping cannot do."""

import math

import numpy as np
import pytest
import torch

from stagewise.models import Network, build_arch
from stagewise.recipe import ArmConfig, ComputeConfig, ProbeStage, RecipeError
from stagewise.training.cache import ImageSet
from stagewise.training.compute import resolve_compute
from stagewise.training.dp_sgd import DpSgd, PrivateTraining
from stagewise.training.engine import batches, epoch_order, fit_stage
from stagewise.training.objectives import masked_bce
from stagewise.training.privacy_budget import (budget_text, epsilon_spent, noise_for_target, privacy_summary,
                                               site_noise, stage_steps)

FP32 = resolve_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False))


def _data(n=24, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    y = (torch.arange(n) % 2).float().unsqueeze(1)
    x[y[:, 0] == 1, :, :8, :8] = 1.0
    return ImageSet(x.half(), key=f"dp{seed}"), y


def _net(arch="scratch:tinycnn"):
    torch.manual_seed(0)
    return Network.build(build_arch(arch), dropout=0.0)


def _head_grad(net):
    return torch.cat([p.grad.reshape(-1) for p in net.head.parameters()])


def test_every_images_gradient_is_clipped_to_the_bound_before_the_sum():
    images, y = _data(8)
    x = images.x.float()
    net = _net()
    net.train()
    net.backbone.eval()  # bn: freeze: a frozen group's BatchNorm uses its fixed statistics, not the batch's
    for p in net.parameters():
        p.requires_grad_(False)
    for p in net.head.parameters():
        p.requires_grad_(True)
    own = []  # each image's gradient alone, by plain autograd
    for i in range(8):
        net.zero_grad(set_to_none=True)
        masked_bce(net(x[i:i + 1]), y[i:i + 1]).backward()
        own.append(_head_grad(net).clone())
    norms = torch.stack([g.norm() for g in own])
    clip = float(norms.median())  # half the images above the bound, half below: the bound must bite
    opt = torch.optim.SGD(net.head.parameters(), lr=0.0)
    private = PrivateTraining(net, opt, DpSgd(noise_multiplier=0.0, clip=clip), n_train=8, steps_per_epoch=1, seed=0)
    private.track()
    for i in range(8):  # one image at a time through Opacus: what it adds is that image's clipped gradient
        private.optimizer.zero_grad(set_to_none=True)
        masked_bce(net(x[i:i + 1]), y[i:i + 1]).backward()
        private.optimizer.pre_step()
        added = _head_grad(net) * private.expected_batch_size
        assert added.norm() <= clip * (1 + 1e-5)
        torch.testing.assert_close(added, own[i] * min(1.0, clip / float(norms[i])), rtol=1e-4, atol=1e-6)
    private.optimizer.zero_grad(set_to_none=True)  # a batch of all eight: the sum of the clipped gradients
    masked_bce(net(x), y).backward()
    private.optimizer.pre_step()
    expected = sum(g * min(1.0, clip / float(n)) for g, n in zip(own, norms))
    torch.testing.assert_close(_head_grad(net) * private.expected_batch_size, expected, rtol=1e-4, atol=1e-5)
    assert (norms > clip).sum() >= 3  # not vacuous: several images were clipped
    private.close()
    assert not any(hasattr(p, "grad_sample") for p in net.parameters())  # Opacus leaves nothing behind


def test_the_accountant_gives_opacus_published_epsilon():
    # Opacus' own worked example (opacus/tests/accountants_test.py, AccountingTest.test_rdp_accountant
    # and test_prv_accountant, Opacus 1.6.0): noise multiplier 1.5, sampling rate 0.04, delta 1e-5,
    # int(90 / 0.04) = 2250 steps -> epsilon 7.32911117143 (RDP); int(90 // 0.04) = 2249 -> 6.777395712150674 (PRV)
    history = [(1.5, 0.04, int(90 / 0.04))]
    assert epsilon_spent(history, 1e-5, "rdp") == pytest.approx(7.32911117143, abs=1e-6)
    assert epsilon_spent([(1.5, 0.04, int(90 // 0.04))], 1e-5, "prv") == pytest.approx(6.777395712150674, abs=1e-4)
    # the same history given as two entries composes to the same epsilon
    assert epsilon_spent([(1.5, 0.04, 1000), (1.5, 0.04, 1250)], 1e-5) == pytest.approx(7.32911117143, abs=1e-6)
    assert epsilon_spent(history, 1e-5) > epsilon_spent([(2.0, 0.04, 2250)], 1e-5)  # more noise, less spent
    assert epsilon_spent([], 1e-5) == 0.0 and math.isinf(epsilon_spent([(0.0, 0.04, 10)], 1e-5))


def test_a_target_epsilon_gives_opacus_noise_multiplier_and_never_more_epsilon():
    # Opacus' test_get_noise_multiplier_rdp_epochs: target epsilon 8, delta 1e-5, sampling rate 0.04,
    # 90 epochs -> 1.416 (its bisection stops within 0.01 of the target epsilon, from above)
    noise = noise_for_target(8.0, 1e-5, [(0.04, int(90 / 0.04))])
    assert noise == pytest.approx(1.416, abs=0.005)
    spent = epsilon_spent([(noise, 0.04, int(90 / 0.04))], 1e-5)
    assert spent <= 8.0 and spent == pytest.approx(8.0, abs=0.05)


def test_a_sites_noise_spends_its_target_over_every_round_of_every_stage():
    from stagewise.recipe import PrivacyConfig

    stages = [ProbeStage(epochs=2, batch_size=8, rounds=3), ProbeStage(epochs=1, batch_size=16, rounds=2)]
    cfg = PrivacyConfig(target_epsilon=8.0, delta=1e-5)
    noise = site_noise(cfg, stages, n_train=40)
    shape = [stage_steps(s, 40) for s in stages]
    assert shape == [(1 / 5, 5 * 2 * 3), (1 / 3, 3 * 1 * 2)]  # 40 images: 5 batches of 8, 3 of 16 (the last 8)
    spent = epsilon_spent([(noise, q, n) for q, n in shape], 1e-5)
    assert 7.9 <= spent <= 8.0
    assert site_noise(PrivacyConfig(noise_multiplier=1.3), stages, 40) == 1.3


def test_no_noise_and_no_clipping_give_the_non_dp_stage_on_the_same_batches(monkeypatch):
    """What differs by design: DP-SGD draws Poisson batches (each image independently), the plain
    loop shuffled batches. Given the same batches, the weights agree to float summation order
    (Opacus sums per-image gradients, autograd the batch's), and the loss of every epoch too."""
    images, y = _data(24)
    stage = ProbeStage(epochs=2, batch_size=8, lr=1e-2)
    plain = _net()
    log_plain = fit_stage(plain, stage, images, np.arange(24), y, FP32, None, seed=3)

    def same_batches(self, idx, g):  # the plain loop's draw, on the same generator
        return batches(epoch_order(idx, y[idx, 0].numpy(), False, g), stage.batch_size)

    monkeypatch.setattr(PrivateTraining, "batches", same_batches)
    private = _net()
    log_private = fit_stage(private, stage, images, np.arange(24), y, FP32, None, seed=3,
                            privacy=DpSgd(noise_multiplier=0.0, clip=math.inf))
    for (name, a), b in zip(plain.state_dict().items(), private.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert [e["loss"] for e in log_private.epochs] == pytest.approx([e["loss"] for e in log_plain.epochs], rel=1e-6)
    assert log_private.privacy == {"noise_multiplier": 0.0, "sample_rate": 1 / 3, "steps": 6, "clip": math.inf}


def test_dp_sgd_draws_poisson_batches_adds_noise_and_counts_its_steps():
    images, y = _data(24)
    stage = ProbeStage(epochs=2, batch_size=8, lr=1e-2)
    runs = []
    for seed in (3, 3, 4):
        net = _net()
        log = fit_stage(net, stage, images, np.arange(24), y, FP32, None, seed=seed,
                        privacy=DpSgd(noise_multiplier=1.0, clip=1.0))
        runs.append(torch.cat([p.reshape(-1) for p in net.head.parameters()]))
        assert log.privacy["steps"] == 6 and log.privacy["sample_rate"] == pytest.approx(1 / 3)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])  # seeded noise: repeatable


def test_the_budget_is_stated_plainly_where_it_means_nothing():
    assert budget_text(7.91, 1e-5) == "epsilon 7.91 at delta 1e-05"
    assert budget_text(250.0, 1e-5) == "epsilon 250 at delta 1e-05: no meaningful privacy guarantee"
    assert budget_text(math.inf, 1e-5) == "epsilon infinite (no noise): no privacy guarantee"
    from stagewise.recipe import PrivacyConfig

    rounds = [{"site_privacy": {"A": {"noise_multiplier": 0.3, "sample_rate": 0.5, "steps": 40}}},
              {"site_privacy": {"A": {"noise_multiplier": 0.3, "sample_rate": 0.5, "steps": 40},
                                "B": {"noise_multiplier": 2.0, "sample_rate": 0.5, "steps": 4}}}]
    summary = privacy_summary(PrivacyConfig(noise_multiplier=0.3), rounds)
    a, b = summary["sites"]["A"], summary["sites"]["B"]
    assert a["steps"] == 80 and a["epsilon"] == pytest.approx(epsilon_spent([(0.3, 0.5, 80)], 1e-5))
    assert a["epsilon"] > 100 and not a["meaningful"] and a["statement"].endswith("no meaningful privacy guarantee")
    assert b["meaningful"] and b["steps"] == 4


def _arm(stage, **sites):
    return {"name": "f", "backbone": "scratch:resnet18", "sites": {"mode": "federated", **sites}, "stages": [stage]}


def test_validate_refuses_a_dp_stage_that_trains_batchnorm_with_the_reason_and_the_fix():
    from stagewise.study.preflight import arm_problems

    thaw = {"kind": "thaw", "rounds": 2, "epochs": 1, "unfreeze": {"layer4": 0.0}}
    (problem,) = arm_problems(ArmConfig.model_validate(_arm(thaw, privacy={"noise_multiplier": 1.0})))
    assert "stage 0 (thaw) under sites.privacy: trains layer4" in problem
    assert "BatchNorm layers run in train mode" in problem and "probe stage" in problem
    probe = {"kind": "probe", "rounds": 2, "epochs": 1}
    assert arm_problems(ArmConfig.model_validate(_arm(probe, privacy={"noise_multiplier": 1.0}))) == []
    assert arm_problems(ArmConfig.model_validate(_arm(thaw))) == []  # without privacy: nothing to refuse


@pytest.mark.parametrize("stage, sites, words", [
    ({"bn": "adapt"}, {}, "bn: adapt estimates BatchNorm statistics"),
    ({"bn": "adapt_once"}, {}, "use bn: freeze"),
    ({"cutmix": {"alpha": 1.0}}, {}, "cutmix/mixup blend two images"),
    ({"balanced_sampling": True}, {}, "remove balanced_sampling"),
    ({}, {"strategy": "fedprox"}, "use fedavg or fedadam"),
])
def test_the_recipe_refuses_what_per_image_clipping_cannot_do(stage, sites, words):
    from stagewise.recipe import recipe_from_dict

    arm = _arm({"kind": "probe", "rounds": 2, "epochs": 1, **stage}, privacy={"noise_multiplier": 1.0}, **sites)
    with pytest.raises(RecipeError, match="sites.privacy|" + words) as err:
        recipe_from_dict({"name": "t", "cohort": {"manifest": "x.csv", "site": "site"}, "arms": [arm]})
    assert words in str(err.value)


def test_privacy_needs_one_source_of_noise_and_a_federated_arm():
    with pytest.raises(ValueError, match="either privacy.noise_multiplier or privacy.target_epsilon"):
        ArmConfig.model_validate(_arm({"kind": "probe", "rounds": 1}, privacy={}))
    with pytest.raises(ValueError, match="sites.privacy is for a federated arm"):
        ArmConfig.model_validate({"name": "p", "backbone": "scratch:resnet18", "sites": {"privacy": {"noise_multiplier": 1}},
                                  "stages": [{"kind": "probe"}]})
