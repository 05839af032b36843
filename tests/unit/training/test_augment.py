"""The BPD code's augmentations (crop, blur, pixel masking, with flip and rotation) and
weight decay per layer group: each does what the recipe says, nothing at p = 0, the same
thing for the same seed."""

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from stagewise.models import Network, build_arch
from stagewise.recipe import AugmentConfig, ComputeConfig, RecipeError, ThawStage, parse_stage
from stagewise.training.augment import augment_batch
from stagewise.training.cache import ImageSet
from stagewise.training.compute import resolve_compute
from stagewise.training.engine import StageError, fit_stage, plan_stage

FP32 = resolve_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False))


def _images(n=6, size=32, seed=0):
    """Smooth structured images (a blur or a crop visibly changes them), values inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = 0.2 + 0.3 * xx + 0.2 * torch.sin(6 * yy)
    x = base.expand(n, 1, size, size).clone()
    x[:, :, 8:12, 4:28] = 0.9  # an edge for blur to soften
    return (x + 0.05 * torch.rand(n, 1, size, size, generator=g)).clamp(0.01, 0.99)


def _run(cfg: dict, x=None, seed=0):
    x = _images() if x is None else x
    return augment_batch(x.clone(), AugmentConfig(**cfg), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [
    {"crop": {"p": 0.0}},
    {"blur": {"p": 0.0}},
    {"mask": {"p": 0.0}},
    {"crop": {"p": 0.0}, "blur": {"p": 0.0}, "mask": {"p": 0.0}},
])
def test_each_augmentation_is_the_identity_at_p_zero(cfg):
    x = _images()
    assert torch.equal(_run(cfg, x), x)


def test_flip_mirrors_images_left_to_right():
    x = _images()
    out = _run({"flip": True}, x, seed=3)
    mirrored = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x)]
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)]
    assert all(m or s for m, s in zip(mirrored, same))
    assert any(mirrored) and any(same)  # p 0.5 per image


def test_rotation_turns_images_by_at_most_the_given_angle():
    x = _images(n=1)
    out = _run({"rotate": 5.0}, x, seed=1)
    assert not torch.allclose(out, x)
    # Within 5 degrees of the centre the image moves at most 5 degrees' arc: compare with the
    # two extreme rotations by torchvision.
    lo = v2.functional.rotate(x, -5.0, interpolation=v2.InterpolationMode.BILINEAR)
    hi = v2.functional.rotate(x, 5.0, interpolation=v2.InterpolationMode.BILINEAR)
    centre = (slice(None), slice(None), slice(10, 22), slice(10, 22))
    err = (out - x)[centre].abs().max()
    assert err <= max((lo - x)[centre].abs().max(), (hi - x)[centre].abs().max()) + 1e-3


def test_crop_resizes_a_box_of_the_given_area_back_to_full_size():
    x = _images(n=8, size=48)
    cfg = {"crop": {"scale": [0.5, 0.5], "ratio": [1.0, 1.0]}}  # a 34 x 34 box, resized to 48
    out = _run(cfg, x, seed=0)
    assert out.shape == x.shape
    assert all(not torch.allclose(o, i) for o, i in zip(out, x))
    # Each output is torchvision's resize of some 34 x 34 box of its input: find it.
    side = round(48 * 0.5**0.5)
    for o, i in zip(out, x):
        best = min(
            (v2.functional.resize(i[:, t:t + side, l:l + side], [48, 48], antialias=True) - o).abs().max().item()
            for t in range(48 - side + 1) for l in range(48 - side + 1)
        )
        assert best < 1e-5


def test_crop_at_the_bpd_scale_range_stays_close_to_the_image():
    """scale 0.95-1.05 (the BPD code): boxes of 95-100 % of the area; above 1 does not fit a
    square image and torchvision falls back to the whole image."""
    x = _images(n=8, size=64)
    out = _run({"crop": {}}, x, seed=2)
    assert out.shape == x.shape
    diff = (out - x).abs().mean(dim=(1, 2, 3))
    assert (diff < 0.05).all() and (diff > 0).any()


def test_blur_smooths_the_chosen_images_only():
    x = _images(n=16)
    out = _run({"blur": {"kernel": 9, "sigma": [1.5, 2.0], "p": 0.5}}, x, seed=0)
    changed = [not torch.equal(o, i) for o, i in zip(out, x)]
    assert 2 <= sum(changed) <= 14  # p 0.5 of 16 images
    for o, i, c in zip(out, x, changed):
        if c:  # a blur lowers the local variation: horizontal gradients shrink
            assert (o[..., 1:, :] - o[..., :-1, :]).abs().mean() < (i[..., 1:, :] - i[..., :-1, :]).abs().mean()
    one = _run({"blur": {"kernel": 9, "sigma": [2.0, 2.0], "p": 1.0}}, x[:1], seed=0)
    assert torch.allclose(one, v2.functional.gaussian_blur(x[:1], [9, 9], [2.0, 2.0]), atol=1e-6)


def test_mask_sets_the_given_share_of_pixels_in_the_chosen_images():
    x = _images(n=40, size=64)
    out = _run({"mask": {"fraction": 0.25, "p": 0.5, "value": 0.0}}, x, seed=0)
    masked = (out == 0) & (x != 0)
    per_image = masked.float().mean(dim=(1, 2, 3))
    chosen = per_image > 0
    assert 10 <= int(chosen.sum()) <= 30
    assert torch.allclose(per_image[chosen], torch.full_like(per_image[chosen], 0.25), atol=0.03)
    assert torch.equal(out[~chosen], x[~chosen])
    assert torch.equal(out[~masked], x[~masked])  # unmasked pixels untouched
    mid = _run({"mask": {"fraction": 0.25, "p": 1.0, "value": 0.5}}, x[:2], seed=0)
    assert ((mid == 0.5) & (x[:2] != 0.5)).float().mean() == pytest.approx(0.25, abs=0.02)


def test_mask_works_on_volumes_and_crop_refuses_them():
    vol = torch.rand(2, 1, 8, 16, 16)
    out = augment_batch(vol, AugmentConfig(mask={"p": 1.0}), torch.Generator().manual_seed(0))
    assert (out == 0).float().mean() == pytest.approx(0.25, abs=0.03)
    with pytest.raises(ValueError, match="augment.crop is a 2D augmentation"):
        augment_batch(vol, AugmentConfig(crop={}), torch.Generator().manual_seed(0))


def test_bpd_augmentations_are_seeded_and_leave_the_global_generator_alone():
    cfg = {"flip": True, "rotate": 5, "crop": {}, "blur": {}, "mask": {"p": 1.0}}
    x = _images(n=8, size=32)
    torch.manual_seed(123)
    a = _run(cfg, x, seed=7)
    after_a = torch.rand(3)
    torch.manual_seed(123)
    b = _run(cfg, x, seed=7)
    after_b = torch.rand(3)
    assert torch.equal(a, b)
    assert torch.equal(after_a, after_b)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_a)  # as if no augmentation had run
    assert not torch.equal(_run(cfg, x, seed=8), a)


def test_augmentation_settings_are_checked_in_the_recipe():
    with pytest.raises(RecipeError, match="kernel 8: a Gaussian kernel size is odd"):
        parse_stage({"kind": "finetune", "augment": {"blur": {"kernel": 8}}})
    with pytest.raises(RecipeError, match=r"augment.crop.scale.*low <= high"):
        parse_stage({"kind": "finetune", "augment": {"crop": {"scale": [1.05, 0.95]}}})
    with pytest.raises(RecipeError, match="augment.mask.fraction"):
        parse_stage({"kind": "finetune", "augment": {"mask": {"fraction": 1.5}}})
    assert parse_stage({"kind": "finetune", "augment": {"mask": {}}}).random_input


def test_weight_decay_per_group_reaches_the_optimizer_groups():
    g = torch.Generator().manual_seed(0)
    images = ImageSet(torch.rand(16, 1, 32, 32, generator=g).half(), key="wd")
    y = (torch.arange(16) % 2).float().unsqueeze(1)
    torch.manual_seed(0)
    net = Network.build(build_arch("scratch:resnet18"), dropout=0.0)
    wd = {"head": 1e-5, "layer4": 1e-4, "layer3": 1e-4}
    stage = ThawStage(epochs=2, batch_size=8, unfreeze={"layer4": 0.0, "layer3": 0.5},
                      lr={"head": 1e-3, "layer4": 5e-4, "layer3": 2.5e-4}, weight_decay=wd)
    log = fit_stage(net, stage, images, np.arange(16), y, FP32, None, seed=0)
    for entry in log.epochs:  # read back from the optimizer's param groups
        assert entry["weight_decay"] == wd
    # groups not listed take the head's value; one value applies to every group
    plan = plan_stage(ThawStage(unfreeze={"layer4": 0.1, "layer2": 0.5}, weight_decay={"head": 1e-5, "layer4": 1e-3}),
                      ["stem", "layer1", "layer2", "layer3", "layer4", "head"])
    assert plan.weight_decay == {"head": 1e-5, "layer4": 1e-3, "layer2": 1e-5}
    assert plan_stage(ThawStage(unfreeze={"layer4": 0.1}, weight_decay=0.02), ["layer4", "head"]).weight_decay == {
        "head": 0.02, "layer4": 0.02}


def test_weight_decay_per_group_needs_a_head_and_known_groups():
    with pytest.raises(RecipeError, match="per-group `weight_decay` needs a `head` entry"):
        parse_stage({"kind": "thaw", "unfreeze": {"layer4": 0.1}, "weight_decay": {"layer4": 1e-4}})
    stage = parse_stage({"kind": "thaw", "unfreeze": {"layer4": 0.1}, "weight_decay": {"head": 1e-5, "layer9": 1e-4}})
    with pytest.raises(StageError, match="layer9"):
        plan_stage(stage, ["stem", "layer4", "head"])
