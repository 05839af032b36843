"""Backbones load through each library's own cache, from files the tests create locally;
weights files are read as tensors only (a crafted pickle anywhere a loader looks runs no
code); the registry is the one list of sources."""

import os
import pickle
import urllib.error

import pytest
import torch

from stagewise.models import (
    BackboneError,
    WeightsUnavailable,
    build_arch,
    create_backbone,
    describe_sources,
    list_archs,
    list_sources,
    registry,
    save_backbone,
)


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
    loaded = create_backbone(f"file:{path}", arch="torchvision:resnet18")
    assert torch.equal(_features(original), _features(loaded))


def test_xrv_resnet_loads_from_its_cache_in_the_library_format(tmp_path):
    import torchvision
    import torchxrayvision as xrv

    # The same network torchxrayvision builds, saved as the state dict file it downloads.
    net = torchvision.models.resnet50(weights=None, num_classes=18)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    url = xrv.models.model_urls["resnet50-res512-all"]["weights_url"]
    torch.save(net.state_dict(), tmp_path / os.path.basename(url))
    backbone = create_backbone("xrv:resnet50-res512-all", cache_dir=tmp_path)
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
        create_backbone("xrv:resnet50-res512-all", cache_dir=tmp_path)
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
        create_backbone("torchvision:resnet50", cache_dir=tmp_path)
    assert str(tmp_path / "resnet50-11ad3fa6.pth") in str(err.value)


def test_timm_pretrained_from_a_local_file_has_timm_groups(tmp_path):
    import timm

    reference = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = create_backbone("timm:resnet18", weights=path)
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


# --- never unpickle an untrusted file -------------------------------------------------


class _Payload:
    """Unpickling this creates `marker`: what a malicious weights file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker, fmt="zip"):
    """A crafted pickle at `path`: torch's current format, its pre-1.6 format, or a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"conv1.weight": torch.zeros(1), "evil": _Payload(marker)}
    if fmt == "zip":
        torch.save(payload, path)
    elif fmt == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def _xrv_target(tmp_path, weights):
    import torchxrayvision as xrv

    return tmp_path / os.path.basename(xrv.models.model_urls[weights]["weights_url"])


@pytest.fixture()
def no_download(monkeypatch):
    import torchxrayvision as xrv

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(xrv.utils, "download", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["zip", "legacy", "bare"])
@pytest.mark.parametrize("weights", ["resnet50-res512-all", "densenet121-res224-all"])
def test_a_crafted_pickle_in_the_xrv_cache_is_refused_and_runs_nothing(tmp_path, no_download, weights, fmt):
    marker = tmp_path / "MARKER"
    target = _plant(_xrv_target(tmp_path / "cache", weights), marker, fmt)
    with pytest.raises(WeightsUnavailable) as err:
        create_backbone(f"xrv:{weights}", cache_dir=tmp_path / "cache")
    assert str(target) in str(err.value) and "never runs code" in str(err.value)
    assert not marker.exists()


def test_a_damaged_xrv_file_names_the_file_and_where_to_get_it_again(tmp_path, no_download):
    import torchxrayvision as xrv

    target = _xrv_target(tmp_path, "resnet50-res512-all")
    torch.save(build_arch("xrv:resnet50-res512-all").net.state_dict(), target)
    target.write_bytes(target.read_bytes()[:5000])  # an interrupted copy
    with pytest.raises(WeightsUnavailable, match="download it again") as err:
        create_backbone("xrv:resnet50-res512-all", cache_dir=tmp_path)
    assert str(target) in str(err.value) and xrv.models.model_urls["resnet50-res512-all"]["weights_url"] in str(err.value)


def test_a_whole_pickled_network_of_other_classes_is_refused(tmp_path, no_download):
    import torchvision

    target = _xrv_target(tmp_path, "densenet121-res224-all")
    torch.save(torchvision.models.resnet18(weights=None), target)  # a network, but not torchxrayvision's
    with pytest.raises(WeightsUnavailable, match="torchvision.models.resnet.ResNet") as err:
        create_backbone("xrv:densenet121-res224-all", cache_dir=tmp_path)
    assert str(target) in str(err.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "pre-1.6"])
def test_xrv_densenet_published_as_a_whole_pickled_network_loads_as_tensors(tmp_path, no_download, legacy):
    import torchxrayvision as xrv

    torch.manual_seed(1)
    net = xrv.models.DenseNet(weights=None).eval()
    with torch.no_grad():  # non-trivial running statistics must come through
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    torch.save(net, _xrv_target(tmp_path, "densenet121-res224-all"), _use_new_zipfile_serialization=not legacy)
    backbone = create_backbone("xrv:densenet121-res224-all", cache_dir=tmp_path).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), net.features2(x * 2048 - 1024))
    # ...and, saved by stagewise, it comes back through file: (no library-only buffers left in it)
    loaded = create_backbone(f"file:{save_backbone(backbone, tmp_path / 'trunk.safetensors')}").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), backbone(x))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["zip", "legacy", "bare"])
def test_a_crafted_pth_given_as_file_or_weights_is_refused_and_runs_nothing(tmp_path, fmt):
    marker = tmp_path / "MARKER"
    path = _plant(tmp_path / "weights.pth", marker, fmt)
    for spec, kwargs in [
        (f"file:{path}", {"arch": "torchvision:resnet18"}),
        ("torchvision:resnet18", {"weights": path}),
        ("monai:resnet10", {"weights": path}),
    ]:
        with pytest.raises(BackboneError, match="not a readable weights file") as err:
            create_backbone(spec, **kwargs)
        assert str(path) in str(err.value)
    assert not marker.exists()


def test_a_crafted_pickle_given_to_timm_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    path = _plant(tmp_path / "resnet18.pth", marker)
    with pytest.raises(WeightsUnavailable) as err:
        create_backbone("timm:resnet18", weights=path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_a_crafted_pickle_in_the_torch_hub_cache_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    import torchvision

    marker = tmp_path / "MARKER"
    target = tmp_path / "checkpoints" / os.path.basename(torchvision.models.ResNet18_Weights.DEFAULT.url)
    _plant(target, marker)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailable) as err:
        create_backbone("torchvision:resnet18")
    assert str(target) in str(err.value)
    assert not marker.exists()


# --- errors that say what exists ------------------------------------------------------


def test_unknown_torchvision_weights_list_the_published_ones(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("nothing should be downloaded for an unknown tag")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(BackboneError, match="NOPE") as err:
        create_backbone("torchvision:resnet18.NOPE")
    assert "IMAGENET1K_V1" in str(err.value)


def test_weights_of_another_shape_name_the_file_and_the_mismatch(tmp_path):
    small = save_backbone(build_arch("scratch:tinycnn-4-8-8-8"), tmp_path / "small.safetensors")
    with pytest.raises(BackboneError, match=r"size mismatch for stem\.0\.weight") as err:
        create_backbone(f"file:{small}", arch="scratch:tinycnn")
    assert str(small) in str(err.value)
    one_channel = tmp_path / "gray.pth"
    torch.save(build_arch("scratch:resnet18").net.state_dict(), one_channel)
    with pytest.raises(BackboneError, match=r"conv1\.weight") as err:
        create_backbone(f"file:{one_channel}", arch="torchvision:resnet18")
    assert str(one_channel) in str(err.value) and "do not fit torchvision:resnet18" in str(err.value)


# --- the registry is the one list of sources ------------------------------------------


def test_every_source_is_listed_by_the_cli_and_in_errors():
    from typer.testing import CliRunner

    from stagewise.cli import app

    sources = list_sources()
    assert {"xrv", "torchvision", "timm", "scratch", "monai", "file", "run", "dual"} <= set(sources)
    shown = CliRunner().invoke(app, ["backbones"]).output
    assert all(spec in shown for spec, _ in describe_sources())  # as written, e.g. run:<run-dir>[#<arm>]
    assert all(any(spec.startswith(f"{s}:") for spec, _ in describe_sources()) for s in sources)
    with pytest.raises(BackboneError) as err:
        create_backbone("keras:resnet50")
    assert all(repr(s) in str(err.value) for s in sources)


def test_adding_a_source_is_one_registration(monkeypatch):
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))  # undone after the test

    def toy(name):
        backbone = build_arch("scratch:tinycnn")
        backbone.arch = f"toy:{name}"
        return backbone

    registry.register_source(
        "toy", archs=("tiny",), build_arch=toy, load_pretrained=lambda name, **_: toy(name), describe=[("toy:<x>", "a toy")]
    )
    assert create_backbone("toy:tiny").arch == "toy:tiny" and build_arch("toy:tiny").arch == "toy:tiny"
    assert "toy:tiny" in list_archs() and ("toy:<x>", "a toy") in describe_sources()
    with pytest.raises(ValueError, match="twice"):
        registry.register_source("toy", build_arch=toy, load_pretrained=toy, describe=[])
