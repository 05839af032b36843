"""Freezing from training dynamics, activation memory, tiny CNNs and dual-input-output training."""

import math

import numpy as np
import pytest
import torch

from stagewise.models import Network, build_arch
from stagewise.recipe import ComputeConfig, DualStage, DynamicStage, ThawStage
from stagewise.training.cache import ImageSet
from stagewise.training.compute import resolve_compute
from stagewise.training.stages.dynamic import DynamicFreezer, candidate_tensors
from stagewise.training.engine import fit_stage
from stagewise.training.objectives import Objective
from stagewise.training.memory import SavedActivations, frozen_weights_save_no_input

FP32 = resolve_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False))


def _net(arch="scratch:resnet18", seed=0, outputs=1):
    torch.manual_seed(seed)
    return Network.build(build_arch(arch), outputs, dropout=0.0)


def test_dynamic_scheduler_freezes_the_fraction_never_the_head_and_frozen_tensors_stay_put():
    net = _net("scratch:tinycnn")
    freezer = DynamicFreezer(net.backbone, fraction=0.75, every=3)
    assert not any(p is q for p in net.head.parameters() for q in freezer.tensors.values())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.rand(8, 1, 28, 28), torch.rand(8, 1).round()
    seen_sets = set()
    for it in range(15):
        freezer.before_step()
        if it >= 3:
            assert len(freezer.frozen) == math.floor(0.75 * len(freezer.tensors))
            seen_sets.add(frozenset(freezer.frozen))
        before = {n: p.detach().clone() for n, p in freezer.tensors.items()}
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        freezer.after_step()
        for n in freezer.frozen:
            assert torch.equal(before[n], freezer.tensors[n]), n
        assert all(p.requires_grad for p in net.head.parameters())
    assert len(seen_sets) > 1  # stale scores let the frozen set rotate


def test_candidates_are_weight_tensors_and_norm_weights():
    net = _net("scratch:tinycnn")
    names = candidate_tensors(net.backbone)
    assert all(not n.endswith("bias") for n in names)
    assert any(p.dim() == 1 for p in names.values())  # BatchNorm weights are candidates


def _saved_and_grads(net, x, patch, bits=None, checkpoint=False):
    meter = SavedActivations(net, bits)
    net.zero_grad(set_to_none=True)
    net.backbone.checkpoint_groups = checkpoint
    ctx = frozen_weights_save_no_input(net.backbone) if patch else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with ctx, meter.step():
        net(x).sum().backward()
    net.backbone.checkpoint_groups = False
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return meter.steps[-1], grads


def test_frozen_layers_stop_saving_inputs_and_gradients_stay_exact():
    net = _net()
    x = torch.rand(4, 1, 64, 64)
    full, _ = _saved_and_grads(net, x, patch=False)
    for name, p in net.backbone.named_parameters():  # SlimFit-style: most frozen, the stem trains
        p.requires_grad_(name.startswith("net.conv1") or name.startswith("net.bn1"))
    plain, grads_plain = _saved_and_grads(net, x, patch=False)
    slim, grads_slim = _saved_and_grads(net, x, patch=True)
    assert slim < plain <= full
    assert slim < 0.8 * full  # BatchNorm and ReLU still keep theirs
    assert grads_plain.keys() == grads_slim.keys()
    for n in grads_plain:
        torch.testing.assert_close(grads_slim[n], grads_plain[n], rtol=1e-4, atol=1e-5, msg=n)


def test_checkpointing_and_8bit_activations_cut_saved_bytes():
    net = _net()
    x = torch.rand(4, 1, 64, 64)
    full, grads = _saved_and_grads(net, x, patch=False)
    ckpt, grads_ckpt = _saved_and_grads(net, x, patch=False, checkpoint=True)
    q8, grads_q8 = _saved_and_grads(net, x, patch=False, bits=8)
    assert ckpt < 0.5 * full and q8 < 0.4 * full
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-4, atol=1e-5, msg=n)
    cos = torch.nn.functional.cosine_similarity(grads_q8["head.layers.1.weight"].flatten(), grads["head.layers.1.weight"].flatten(), dim=0)
    assert cos > 0.99  # approximate, but pointing the same way


def test_dynamic_stage_records_memory_and_frozen_share():
    net = _net("scratch:tinycnn")
    images = ImageSet(torch.rand(32, 1, 28, 28).half(), "k")
    y = (torch.arange(32) % 2).float().unsqueeze(1)
    log = fit_stage(net, DynamicStage(epochs=2, batch_size=8, freeze_fraction=0.8, freeze_every=2),
                    images, np.arange(32), y, FP32, None, seed=0)
    n = len(candidate_tensors(net.backbone))
    assert log.epochs[-1]["frozen_tensor_share"] == pytest.approx(math.floor(0.8 * n) / n)
    assert log.memory["saved_activation_median_bytes"] < log.memory["saved_activation_peak_bytes"]
    assert log.memory["peak_rss_bytes"] > 0


def test_tiny_cnn_is_small():
    net = _net("scratch:tinycnn", outputs=10)
    n = sum(p.numel() for p in net.parameters())
    assert 10_000 < n <= 15_000
    assert n * 4 / 2**20 < 0.2  # MB in float32


def test_merged_dual_model_equals_the_pair_on_the_original_stream():
    net = _net("dual:scratch:tinycnn-6-12-20-20", outputs=10)
    images = ImageSet(torch.rand(32, 1, 28, 28).half(), "k")
    y = torch.randint(0, 10, (32, 1)).float()
    stage = DualStage(epochs=1, batch_size=8, augment={"rotate": 15, "translate": 0.1})
    fit_stage(net, stage, images, np.arange(32), y, FP32, None, seed=0, objective=Objective("multiclass", 10))
    net.eval()
    x = images.x[:4].float()
    with torch.no_grad():
        merged = net(x)
        pair = net.head(net.backbone.forward_pair(x, x))
        a_only = net.backbone.net["a"](x)
        b_only = net.backbone.net["b"](x)
    assert torch.equal(merged, pair)
    assert not torch.allclose(a_only, b_only)  # two branches, trained on different streams
    # progressive unfreezing of the merged model, last group first
    thaw = ThawStage(epochs=2, batch_size=8, unfreeze={"block3": 0.0, "block2": 0.5}, lr=1e-3)
    before = {n: p.clone() for n, p in net.named_parameters()}
    fit_stage(net, thaw, images, np.arange(32), y, FP32, None, seed=0, objective=Objective("multiclass", 10))
    changed = {n for n, p in net.named_parameters() if not torch.equal(before[n], p)}
    assert any("block3" in n for n in changed) and any("block2" in n for n in changed)
    assert not any("stem" in n or "block1" in n for n in changed)


def test_frozen_weights_with_trainable_biases_keep_exact_gradients():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(),
                              torch.nn.Linear(256, 1))
    x = torch.randn(32, 64, requires_grad=True)
    for layer in (mlp[0], mlp[2]):
        layer.weight.requires_grad_(False)  # SlimFit freezes weight tensors; biases keep training

    def run(patch):
        meter = SavedActivations(mlp)
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        ctx = frozen_weights_save_no_input(mlp) if patch else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with ctx, meter.step():
            mlp(x).pow(2).sum().backward()
        return meter.steps[-1], [p.grad.clone() for p in mlp.parameters() if p.grad is not None] + [x.grad.clone()]

    plain, grads_plain = run(False)
    slim, grads_slim = run(True)
    assert slim <= plain  # PyTorch's addmm already skips the input when the weight is frozen
    for a, b in zip(grads_plain, grads_slim):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
