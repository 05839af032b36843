"""The BPD paper's published models as a backbone source: a checkpoint built here in exactly
the authors' format (their BPDModel wrapper around a torchxrayvision-shaped ResNet-50, saved
as {"model_state_dict": ...} beside a pickled __main__.ModelConfig) loads by name and as
`file:`, every key mapped, and gives the logits of the original module layout."""

import copy
import dataclasses
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from stagewise.models import BackboneError, Network, WeightsUnavailable, create_backbone
from stagewise.models.bpd import DATA_CLASSES, backbone_from_checkpoint
from stagewise.models.safe_pickle import load_checkpoint
from stagewise.recipe import ArmConfig, ComputeConfig, RecipeError, recipe_from_dict
from stagewise.training.cache import ImageSet
from stagewise.training.compute import resolve_compute

FP32 = resolve_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False))


class XrvResNetLayout(nn.Module):
    """torchxrayvision's `ResNet`: the torchvision ResNet-50 at `.model`, a 1-channel first
    convolution, 18 outputs, the `op_threshs` buffer; `.features()` runs the trunk and pools
    (torchxrayvision also resizes to 512 px first, which a 512 px input makes a no-op)."""

    def __init__(self):
        super().__init__()
        self.model = torchvision.models.resnet50(weights=None, num_classes=18)
        self.model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.register_buffer("op_threshs", torch.rand(18))

    def features(self, x):
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return torch.flatten(m.avgpool(x), 1)


class BPDModelLayout(nn.Module):
    """bpd_torch.models.model.BPDModel's module tree: `base_model`, a second reference
    `inner_model` to the torchvision net (fc replaced by Identity), Dropout(0.1), `fc`."""

    def __init__(self, base_model):
        super().__init__()
        self.base_model = base_model
        self.is_xrv = hasattr(base_model, "model")
        self.inner_model = base_model.model if self.is_xrv else base_model
        in_features = self.inner_model.fc.in_features
        self.inner_model.fc = nn.Identity()
        self.dropout = nn.Dropout(p=0.1)
        self.fc = nn.Linear(in_features, 1)

    def forward(self, x):
        feats = self.base_model.features(x) if self.is_xrv else self.inner_model(x)
        return self.fc(self.dropout(feats))


@dataclasses.dataclass
class ModelConfig:  # the training script's config, pickled as __main__.ModelConfig
    name: str
    epochs: int


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial weights and BatchNorm statistics, so a wrongly mapped key changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point and "op_threshs" not in name:
                if name.endswith("running_var"):
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                elif name.endswith(("running_mean", "bias")):
                    t.copy_(0.1 * torch.randn(t.shape, generator=g))
                elif name.endswith("weight") and t.dim() == 1:  # BatchNorm scale
                    t.copy_(0.8 + 0.4 * torch.rand(t.shape, generator=g))
    return model.eval()


def _save_checkpoint(model: nn.Module, path, state=None):
    """torch.save as the authors' script: model_state_dict beside a __main__.ModelConfig."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ModelConfig, "__module__", "__main__")
        mp.setattr(sys.modules["__main__"], "ModelConfig", ModelConfig, raising=False)
        state = model.state_dict() if state is None else state
        torch.save({"model_state_dict": state, "config": ModelConfig("bpd_xrv_progfreeze", 20), "epoch": 19}, path)
    return path


@pytest.fixture(scope="module")
def xrv_model():
    torch.manual_seed(0)
    return _randomised(BPDModelLayout(XrvResNetLayout()), seed=1)


@pytest.fixture(scope="module")
def xrv_file(xrv_model, tmp_path_factory):
    return _save_checkpoint(xrv_model, tmp_path_factory.mktemp("bpd") / "bpd_xrv_progfreeze.pth")


@pytest.fixture(scope="module")
def named(xrv_file):
    """The published model by name, from a local copy (backbone.weights)."""
    return create_backbone("bpd:bpd_xrv_progfreeze", weights=xrv_file)


def _images(n=4, size=64, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_checkpoint_in_the_authors_layout_has_the_keys_the_loader_maps(xrv_model):
    keys = set(xrv_model.state_dict())
    assert "base_model.model.conv1.weight" in keys and "inner_model.conv1.weight" in keys
    assert {"fc.weight", "fc.bias", "base_model.op_threshs"} <= keys
    assert not any(k.startswith(("base_model.model.fc.", "inner_model.fc.")) for k in keys)


@pytest.mark.parametrize("how", ["named", "file"])
def test_named_and_file_sources_give_the_original_models_logits(xrv_model, xrv_file, named, how):
    backbone = copy.deepcopy(named) if how == "named" else create_backbone(f"file:{xrv_file}")
    assert backbone.arch == "xrv:resnet50-res512-all" and backbone.input_spec.channels == 1
    net = Network.build(backbone, dropout=0.1, pretrained_head=True).eval()
    x = _images()
    with torch.no_grad():
        ours = net(x)
        theirs = xrv_model((x - 0.5) * 2048)  # xrv.datasets.normalize: [0, 1] -> [-1024, 1024]
    assert ours.shape == theirs.shape == (4, 1)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    assert theirs.std() > 0  # the logits vary between images: the comparison means something
    # every trunk tensor of the file arrived (BatchNorm statistics included)
    state = xrv_model.state_dict()
    for k, v in backbone.net.state_dict().items():
        assert torch.equal(v, state["base_model.model." + k]), k


def test_imagenet_model_layout_loads_too(tmp_path):
    torch.manual_seed(0)
    model = _randomised(BPDModelLayout(torchvision.models.resnet50(weights=None)), seed=2)
    path = _save_checkpoint(model, tmp_path / "bpd_rgb_progfreeze.pth")
    net = Network.build(create_backbone("bpd:bpd_rgb_progfreeze", weights=path), pretrained_head=True).eval()
    assert net.backbone.arch == "torchvision:resnet50"
    x = _images(2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        theirs = model((x.expand(-1, 3, -1, -1) - mean) / std)
        assert torch.allclose(net(x), theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    with pytest.raises(BackboneError, match="holds a torchvision:resnet50 model, but the named model is xrv"):
        create_backbone("bpd:bpd_xrv_fullft", weights=path)


def test_every_key_is_accounted_for(xrv_model, xrv_file):
    """What `file:` and the named source read (load_checkpoint) goes through one mapping that
    uses every tensor: an extra, a missing or an inconsistent one is an error naming it."""
    state = dict(xrv_model.state_dict())
    assert list(load_checkpoint(xrv_file, DATA_CLASSES)) == ["model_state_dict", "config", "epoch"]

    def load(changed):
        return backbone_from_checkpoint({"model_state_dict": changed, "config": None}, "ckpt.pth")

    with pytest.raises(BackboneError, match=r"ckpt.pth: unexpected tensors in a BPD checkpoint: \['projection\.weight'\]"):
        load(state | {"projection.weight": torch.zeros(1)})
    layer5 = {"base_model.model.layer5.weight": torch.zeros(1), "inner_model.layer5.weight": torch.zeros(1)}
    with pytest.raises(BackboneError, match=r"unexpected \['layer5\.weight'\]"):
        load(state | layer5)
    gone = ("base_model.model.layer2.0.bn1.running_var", "inner_model.layer2.0.bn1.running_var")
    with pytest.raises(BackboneError, match=r"missing \['layer2.0.bn1.running_var'\]"):
        load({k: v for k, v in state.items() if k not in gone})
    with pytest.raises(BackboneError, match=r"inner_model.\* does not repeat"):
        load(state | {"inner_model.conv1.weight": state["inner_model.conv1.weight"] + 1})
    assert load({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}) is None  # not this layout


def test_offline_the_error_names_the_download_and_the_place(tmp_path, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailable) as err:
        create_backbone("bpd:bpd_xrv_progfreeze_lp_cutmix", cache_dir=tmp_path / "models")
    text = str(err.value)
    assert "https://cloud.hiz-saarland.de/public.php/dav/files/nLYMSE8jRSg3j8j" in text
    assert str(tmp_path / "models" / "bpd_xrv_progfreeze_lp_cutmix.pth") in text
    with pytest.raises(BackboneError, match="not published; choose one of"):
        create_backbone("bpd:bpd_best")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "bpd_xrv_fullft.pth"
    torch.save({"model_state_dict": {"fc.weight": torch.zeros(1, 2048)}, "hook": torch.nn.ReLU()}, path)
    with pytest.raises(WeightsUnavailable, match="never runs code"):
        create_backbone("bpd:bpd_xrv_fullft", weights=path)


def test_published_head_starts_a_probe_on_local_data(xrv_model, xrv_file, named):
    """A stage chain from the published model: the probe starts at the authors' head and
    moves it, the backbone stays as published."""
    from stagewise.study.fitting import SilentReporter, train_fold

    arm = ArmConfig.model_validate({"name": "bpd", "backbone": {"name": "bpd:bpd_xrv_progfreeze", "weights": str(xrv_file)},
                                    "head": {"pretrained": True},
                                    "stages": [{"kind": "probe", "epochs": 1, "batch_size": 4, "lr": 1e-2}]})
    pristine = named
    images = ImageSet(_images(8, size=32).half(), key="bpd-probe")
    targets = (torch.arange(8) % 2).float().unsqueeze(1)
    net, logs = train_fold(arm, pristine, images, targets, np.arange(8), 0, FP32, None, SilentReporter())
    head = net.head.layers[-1]
    assert not torch.equal(head.weight, xrv_model.fc.weight)  # trained from ...
    assert torch.allclose(head.weight, xrv_model.fc.weight, atol=0.05)  # ... the published head
    fresh = Network.build(copy.deepcopy(pristine), pretrained_head=True)
    assert torch.equal(fresh.head.layers[-1].weight, xrv_model.fc.weight)
    for k, v in net.backbone.net.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, pristine.net.state_dict()[k]), k


def test_pretrained_head_needs_a_published_one_of_the_same_shape(named):
    with pytest.raises(BackboneError, match="come without a head"):
        Network.build(create_backbone("scratch:resnet18"), pretrained_head=True)
    with pytest.raises(BackboneError, match="2 output"):
        Network.build(copy.deepcopy(named), n_outputs=2, pretrained_head=True)
    with pytest.raises(RecipeError, match="head.pretrained loads a published linear head"):
        recipe_from_dict({"name": "t", "cohort": {"manifest": "m.csv"},
                          "arms": [{"name": "a", "backbone": "bpd:bpd_xrv_fullft", "head": {"pretrained": True, "hidden": 8},
                                    "stages": [{"kind": "probe"}]}]})
    with pytest.raises(RecipeError, match="published one-outcome head"):
        recipe_from_dict({"name": "t", "cohort": {"manifest": "m.csv", "extra_outcomes": ["death"]},
                          "arms": [{"name": "a", "backbone": "bpd:bpd_xrv_fullft", "head": {"pretrained": True},
                                    "stages": [{"kind": "probe"}]}]})


def test_validate_names_an_arm_asking_for_a_head_its_backbone_lacks():
    from stagewise.study.preflight import arm_problems

    arm = ArmConfig.model_validate({"name": "a", "backbone": "scratch:resnet18", "head": {"pretrained": True},
                                    "stages": [{"kind": "probe"}]})
    assert any("head.pretrained is set, but scratch:resnet18 comes without a published head" in p
               for p in arm_problems(arm))


def test_a_zero_epoch_probe_scores_the_published_model_as_is(xrv_model, named):
    from stagewise.study.fitting import SilentReporter, train_fold
    from stagewise.training.engine import predict

    arm = ArmConfig.model_validate({"name": "as-is", "backbone": "bpd:bpd_xrv_progfreeze", "head": {"pretrained": True},
                                    "stages": [{"kind": "probe", "epochs": 0}]})
    images = ImageSet(_images(4, size=32).half(), key="bpd-as-is")
    targets = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    net, logs = train_fold(arm, named, images, targets, np.arange(4), 0, FP32, None, SilentReporter())
    assert logs[0]["epochs"] == []
    p = predict(net, images, np.arange(4), FP32, None)
    with torch.no_grad():
        theirs = torch.sigmoid(xrv_model((images.x.float() - 0.5) * 2048)).numpy()
    assert np.allclose(p, theirs, atol=1e-5)
    with pytest.raises(RecipeError, match="epochs"):
        recipe_from_dict({"name": "t", "cohort": {"manifest": "m.csv"},
                          "arms": [{"name": "a", "backbone": "scratch:resnet18", "stages": [{"kind": "thaw", "epochs": 0,
                                                                                             "unfreeze": {"layer4": 0.1}}]}]})
