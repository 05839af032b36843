"""Backbones load through each library's own mechanism, from files the tests create locally."""

import os
import urllib.error

import pytest
import torch

from stagewise.models import BackboneError, WeightsUnavailable, build_arch, create_backbone, save_backbone
from stagewise.recipe import BackboneConfig


def _features(backbone, channels=1, size=64):
    backbone.eval()
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return backbone(x)


def test_file_backbone_round_trip_gives_identical_features(tmp_path):
    original = build_arch("scratch:resnet18")
    path = save_backbone(original, tmp_path / "trunk.safetensors")
    loaded = create_backbone(f"file:{path}")
    assert loaded.group_names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert torch.equal(_features(original), _features(loaded))
    for a, b in zip(original.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_file_state_dict_needs_and_uses_arch(tmp_path):
    original = build_arch("torchvision:resnet18")
    path = tmp_path / "trunk.pth"
    torch.save(original.net.state_dict(), path)
    with pytest.raises(BackboneError, match="backbone.arch"):
        create_backbone(f"file:{path}")
    loaded = create_backbone(BackboneConfig(name=f"file:{path}", arch="torchvision:resnet18"))
    assert torch.equal(_features(original), _features(loaded))


def test_xrv_resnet_loads_from_its_cache_in_the_library_format(tmp_path):
    import torchvision
    import torchxrayvision as xrv

    # The same network torchxrayvision builds, saved as the state dict file it downloads.
    net = torchvision.models.resnet50(weights=None, num_classes=18)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    url = xrv.models.model_urls["resnet50-res512-all"]["weights_url"]
    torch.save(net.state_dict(), tmp_path / os.path.basename(url))
    backbone = create_backbone(BackboneConfig(name="xrv:resnet50-res512-all", cache_dir=tmp_path))
    assert backbone.input_spec.channels == 1 and backbone.feature_dim == 2048
    x = torch.rand(2, 1, 64, 64)
    net.fc = torch.nn.Identity()
    net.eval(), backbone.eval()
    with torch.no_grad():  # the stagewise input convention is torchxrayvision's [-1024, 1024]
        torch.testing.assert_close(backbone(x), net(x * 2048 - 1024))


def test_missing_xrv_weights_name_the_cache_file(tmp_path, monkeypatch):
    import torchxrayvision as xrv

    def offline(url, filename):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(xrv.utils, "download", offline)
    with pytest.raises(WeightsUnavailable) as err:
        create_backbone(BackboneConfig(name="xrv:resnet50-res512-all", cache_dir=tmp_path))
    assert str(tmp_path / "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt") in str(err.value)


def test_torchvision_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    import torchvision

    weights = torchvision.models.ResNet18_Weights.DEFAULT
    reference = torchvision.models.resnet18(weights=None)
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / os.path.basename(weights.url))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    backbone = create_backbone("torchvision:resnet18")
    assert backbone.input_spec.channels == 3
    reference.fc = torch.nn.Identity()
    reference.eval(), backbone.eval()
    x = torch.rand(2, 1, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), reference((x.expand(-1, 3, -1, -1) - mean) / std))


def test_missing_torchvision_weights_name_the_cache_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailable) as err:
        create_backbone(BackboneConfig(name="torchvision:resnet50", cache_dir=tmp_path))
    assert str(tmp_path / "resnet50-11ad3fa6.pth") in str(err.value)


def test_timm_pretrained_from_a_local_file_has_timm_groups(tmp_path):
    import timm

    reference = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = create_backbone(BackboneConfig(name="timm:resnet18", weights=path))
    assert backbone.group_names == ["stem", "block1", "block2", "block3", "block4"]
    assert not backbone.sequential
    assert sum(len(backbone.group_parameters(g)) for g in backbone.group_names) == len(list(reference.parameters()))
    reference.eval(), backbone.eval()
    x = torch.rand(2, 1, 64, 64)
    spec = backbone.input_spec
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), reference((x.expand(-1, 3, -1, -1) - mean) / std))


def test_unknown_backbones_are_clear_errors():
    with pytest.raises(BackboneError, match="unknown source"):
        create_backbone("keras:resnet50")
    with pytest.raises(BackboneError, match="not supported"):
        create_backbone("scratch:alexnet")


@pytest.mark.parametrize("arch", ["scratch:resnet18", "torchvision:densenet121", "xrv:densenet121-res224-all"])
def test_sequential_backbones_resume_from_any_group(arch):
    backbone = build_arch(arch).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        whole = backbone(x)
        for k in range(1, len(backbone.group_names)):
            torch.testing.assert_close(backbone(backbone(x, 0, k), start=k), whole)


def test_a_copied_timm_backbone_runs_its_own_weights():
    import copy

    original = build_arch("scratch:timm:resnet18").eval()
    clone = copy.deepcopy(original)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(original(x), clone(x))  # a closure over the original net would tie them
