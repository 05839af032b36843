"""Every registered architecture keeps the Backbone contract (the way timm tests every model
in `list_models()`): groups that partition the parameters, resumable sequential forwards,
deep copies that run their own weights, the declared input channels and feature size, and
an exact save -> `file:` round trip. Tiny inputs (32 px; 16^3 voxels, 32^3 for the 3D
DenseNet, which halves the side six times) keep it fast on CPU."""

import copy

import pytest
import torch
from torch import nn

from stagewise.models import build_arch, create_backbone, list_archs, save_backbone


@pytest.fixture(scope="module", params=list_archs())
def backbone(request):
    """Built once per architecture (pytest groups the tests by it), seeded, in eval mode."""
    torch.manual_seed(0)
    return build_arch(request.param).eval()


def _input(backbone) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if backbone.spatial_dims == 3:
        side = 32 if "densenet" in backbone.arch else 16
        return torch.rand(1 if side == 32 else 2, 1, side, side, side, generator=g)
    return torch.rand(2, 1, 32, 32, generator=g)


def test_groups_hold_every_parameter_exactly_once(backbone):
    seen: dict[int, str] = {}
    for group in backbone.group_names:
        for p in backbone.group_parameters(group):
            assert id(p) not in seen, f"a parameter is in groups {seen[id(p)]} and {group}"
            seen[id(p)] = group
    orphans = [n for n, p in backbone.named_parameters() if id(p) not in seen]
    assert not orphans, f"parameters in no group: {orphans[:5]}"


def test_resuming_after_any_group_gives_the_whole_forward(backbone):
    x = _input(backbone)
    with torch.no_grad():
        whole = backbone(x)
        if not backbone.sequential:
            with pytest.raises(RuntimeError, match="runs only whole"):
                backbone(x, stop=1)
            return
        for k in range(1, len(backbone.group_names) + 1):
            torch.testing.assert_close(backbone(backbone(x, stop=k), start=k), whole)


def test_a_deep_copy_runs_its_own_weights(backbone):
    x = _input(backbone)
    clone = copy.deepcopy(backbone)
    assert not {id(p) for p in clone.parameters()} & {id(p) for p in backbone.parameters()}
    with torch.no_grad():
        before = backbone(x)
        torch.testing.assert_close(clone(x), before, rtol=0, atol=0)
        for p in clone.parameters():
            p.mul_(0.5)
        changed = clone(x)
        assert not torch.allclose(changed, before), "the copy ran the original's weights"
        assert torch.equal(backbone(x), before), "changing the copy changed the original"


def test_first_convolution_and_features_match_the_input_spec(backbone):
    first = next(
        (m for name in backbone.groups[backbone.group_names[0]] for m in backbone.net.get_submodule(name).modules()
         if isinstance(m, (nn.Conv2d, nn.Conv3d))),
        None,
    )
    assert first is not None, "no convolution in the first group"
    assert first.in_channels == backbone.input_spec.channels
    assert len(backbone.input_spec.mean) == len(backbone.input_spec.std) == backbone.input_spec.channels
    x = _input(backbone)
    with torch.no_grad():
        assert backbone(x).shape == (len(x), backbone.feature_dim)


def test_saved_backbone_reloads_through_file_with_identical_features(backbone, tmp_path):
    path = save_backbone(backbone, tmp_path / "trunk.safetensors")
    loaded = create_backbone(f"file:{path}").eval()
    assert loaded.arch == backbone.arch and loaded.groups == backbone.groups
    assert loaded.input_spec == backbone.input_spec and loaded.feature_dim == backbone.feature_dim
    x = _input(backbone)
    with torch.no_grad():
        assert torch.equal(loaded(x), backbone(x))
