"""3D volumes: NIfTI files written here flow through readers, preprocessing, MONAI 3D
backbones, augmentation and a whole staged study."""

import itertools
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_recipe
from PIL import Image

from stagewise.data import CohortError, ImageReadError, load_images, read_image
from stagewise.models import build_arch, create_backbone, save_backbone
from stagewise.recipe import AugmentConfig, MixConfig
from stagewise.training.augment import augment_batch, cutmix, mixup

SHAPE_XYZ = (20, 24, 16)  # voxels along x (left -> right), y (back -> front), z (feet -> head)


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


def _anatomy(seed=0, blob=False):
    """Noise, optionally with a bright blob, in RAS storage."""
    rng = np.random.default_rng(seed)
    data = rng.uniform(0.0, 100.0, SHAPE_XYZ)
    if blob:
        data[8:14, 10:16, 6:11] += 250.0
    return data


@pytest.fixture()
def volume_manifest(tmp_path):
    """12 patients, one 20x24x16 volume each; positives carry a bright blob."""
    rows = []
    for i in range(12):
        y = i % 2
        name = f"p{i:02d}.nii.gz" if i % 3 else f"p{i:02d}.nii"
        _save(tmp_path / name, _anatomy(i, blob=bool(y)))
        rows.append({"path": name, "outcome": y, "patient": f"p{i:02d}"})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def test_nifti_reads_as_unit_volume_in_canonical_orientation(tmp_path):
    data = _anatomy()
    ras = read_image(_save(tmp_path / "ras.nii.gz", data))
    assert ras.dtype == np.float32 and ras.shape == (16, 24, 20)  # (D, H, W) = (z, y, x)
    assert ras.min() == 0.0 and ras.max() == 1.0
    # A landmark at (x=3, y=5, z=7) sits at D=z, H counted from the front, W=x.
    marker = np.zeros(SHAPE_XYZ)
    marker[3, 5, 7] = 9.0
    found = read_image(_save(tmp_path / "marker.nii", marker))
    assert np.argwhere(found).tolist() == [[7, 24 - 1 - 5, 3]] and found.max() == 1.0

    # The same anatomy stored flipped in x and y (LPS-like) and with z first.
    flipped = np.eye(4)
    flipped[0, 0], flipped[1, 1] = -1, -1
    flipped[:3, 3] = (SHAPE_XYZ[0] - 1, SHAPE_XYZ[1] - 1, 0)
    lps = read_image(_save(tmp_path / "lps.nii", data[::-1, ::-1, :], flipped))
    permuted = np.zeros((4, 4))
    permuted[0, 2] = permuted[1, 1] = permuted[2, 0] = permuted[3, 3] = 1  # stored as (z, y, x)
    zyx = read_image(_save(tmp_path / "zyx.nii.gz", data.transpose(2, 1, 0), permuted))
    np.testing.assert_array_equal(lps, ras)
    np.testing.assert_array_equal(zyx, ras)

    # 4D: the first volume; one hot voxel does not squeeze the rest into a narrow band.
    series = np.stack([data, data * 0 + 5.0], axis=-1)
    series[0, 0, 0, 0] = 1e6
    first = read_image(_save(tmp_path / "series.nii.gz", series))
    assert first.shape == (16, 24, 20) and first.max() == 1.0 and np.median(first) > 0.3
    assert not read_image(_save(tmp_path / "flat.nii", np.full(SHAPE_XYZ, 7.0))).any()


def test_unreadable_nifti_names_the_file(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ImageReadError, match="broken.nii.gz"):
        read_image(bad)
    flat = _save(tmp_path / "slice.nii", np.ones((5, 6)))
    with pytest.raises(ImageReadError, match="3D"):
        read_image(flat)


def test_load_images_makes_cubes_and_refuses_mixed_cohorts(tmp_path):
    paths = [_save(tmp_path / f"v{i}.nii.gz", _anatomy(i)) for i in range(3)]
    for mode in ("pad", "crop", "stretch"):
        x = load_images(paths, 12, mode)
        assert x.shape == (3, 1, 12, 12, 12) and x.dtype == torch.float16
        assert 0 <= float(x.min()) and float(x.max()) <= 1
    padded = load_images(paths, 12, "pad")  # 16x24x20 -> 8x12x10, centred
    assert not padded[:, :, :2].any() and not padded[:, :, -2:].any() and padded[:, :, 2:-2].any()

    png = tmp_path / "slice.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(png)
    with pytest.raises(CohortError, match=r"row 12: .*slice.png: a 2D image, but row 10"):
        load_images([paths[0], png], 12, rows=[10, 12])


def _input(name):
    if "densenet" in name:  # DenseNet halves the side 6 times: 32^3 at least
        return torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    return torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name, groups",
    [
        ("resnet10", ["stem", "layer1", "layer2", "layer3", "layer4"]),
        ("resnet18", ["stem", "layer1", "layer2", "layer3", "layer4"]),
        ("resnet34", ["stem", "layer1", "layer2", "layer3", "layer4"]),
        ("resnet50", ["stem", "layer1", "layer2", "layer3", "layer4"]),
        ("densenet121", ["stem", "block1", "block2", "block3", "block4"]),
    ],
)
def test_monai_backbones_have_groups_and_resume_from_any_group(name, groups):
    backbone = create_backbone(f"monai:{name}").eval()
    assert backbone.group_names == groups and backbone.spatial_dims == 3 and backbone.sequential
    params = {id(p) for p in backbone.parameters()}
    assert {id(p) for g in groups for p in backbone.group_parameters(g)} == params  # no orphan weights
    x = _input(name)
    # Every resume depth for the small nets; the last one for the big ones (CPU time).
    depths = range(1, len(groups)) if name in ("resnet10", "densenet121") else [len(groups) - 1]
    with torch.no_grad():
        whole = backbone(x)
        assert whole.shape == (len(x), backbone.feature_dim)
        prefix = x
        for k in range(1, len(groups)):
            prefix = backbone(prefix, k - 1, k)  # == backbone(x, 0, k), one group at a time
            if k in depths:
                torch.testing.assert_close(backbone(prefix, start=k), whole)


def test_saved_3d_backbone_round_trips_through_file_and_run(tmp_path):
    torch.manual_seed(0)
    original = build_arch("monai:resnet10").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics must travel too
        for m in original.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
    path = save_backbone(original, tmp_path / "run" / "pretrained" / "arm-0123.safetensors")
    x = _input("resnet10")
    for spec in (f"file:{path}", f"run:{tmp_path / 'run'}"):
        loaded = create_backbone(spec).eval()
        assert loaded.arch == "monai:resnet10"
        for (ka, a), (kb, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
            assert ka == kb and torch.equal(a, b)
        with torch.no_grad():
            assert torch.equal(original(x), loaded(x))


def test_monai_weights_in_medicalnet_layout_load_and_misfits_name_the_file(tmp_path):
    from stagewise.models import BackboneError

    torch.manual_seed(0)
    source = build_arch("monai:resnet10").eval()
    medicalnet = tmp_path / "resnet_10.pth"  # MedicalNet's layout: {"state_dict": {"module.<key>": ...}}
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.net.state_dict().items()}}, medicalnet)
    loaded = create_backbone("monai:resnet10", weights=medicalnet).eval()
    x = _input("resnet10")
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    with pytest.raises(BackboneError, match="do not fit monai:resnet18") as err:
        create_backbone("monai:resnet18", weights=medicalnet)
    assert str(medicalnet) in str(err.value)


def test_volume_augmentation_flips_rotates_and_mixes():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(8, 1, 6, 7, 5, generator=g)
    flipped = augment_batch(v, AugmentConfig(flip=True), torch.Generator().manual_seed(1))
    seen = set()
    for i in range(len(v)):
        match = [d for r in range(4) for d in itertools.combinations((2, 3, 4), r)
                 if torch.allclose(flipped[i], v[i : i + 1].flip(d)[0] if d else v[i], atol=1e-6)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 2  # the axes are flipped independently

    # Rotation is about the axial (D) axis: a volume that varies only along D keeps its slices.
    layered = torch.arange(9.0).view(1, 1, 9, 1, 1).expand(2, 1, 9, 11, 11) / 8
    turned = augment_batch(layered, AugmentConfig(rotate=30), torch.Generator().manual_seed(2))
    torch.testing.assert_close(turned[:, :, :, 5, 5], layered[:, :, :, 5, 5])

    x = torch.arange(6.0).view(6, 1, 1, 1, 1).expand(6, 1, 8, 8, 8).contiguous()
    y = torch.arange(6.0).view(6, 1)
    mixed, ym, lam = cutmix(x, y, MixConfig(alpha=1.0), torch.Generator().manual_seed(3))
    for i in range(6):
        kept = float((mixed[i] == i).float().mean())
        partner = (ym[i, 0] - lam * i) / (1 - lam)  # y mixes as the voxels do
        if round(float(partner)) != i:
            assert kept == pytest.approx(lam)
    blended, _, _ = mixup(x, y, MixConfig(), torch.Generator().manual_seed(4))
    assert blended.shape == x.shape


def test_study_runs_on_volumes_through_probe_thaw_and_finetune(volume_manifest, tmp_path):
    from stagewise.study import run_study

    probe = {"kind": "probe", "epochs": 2, "batch_size": 6, "lr": 3e-3}
    thaw = {"kind": "thaw", "epochs": 1, "batch_size": 6, "lr": 1e-3, "unfreeze": {"layer4": 0.0}}
    finetune = {"kind": "finetune", "epochs": 1, "batch_size": 6, "lr": 1e-4,
                "augment": {"flip": True, "rotate": 10}}
    recipe = small_recipe(
        volume_manifest,
        [{"name": "mri", "backbone": "monai:resnet10", "stages": [probe, thaw, finetune]}],
        data={"image_size": 16},
        protocol={"folds": 2},
        evaluation={"saliency": 0, "bootstrap": 0, "report": False},
    )
    result = run_study(recipe, tmp_path / "run")
    folds = result.metrics["arms"]["mri"]["folds"]
    assert len(folds) == 2 and all(np.isfinite(f["auroc"]) for f in folds)
    assert len(result.predictions) == 12 and result.predictions["prob"].notna().all()
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert len(saved["arms"]["mri"]["folds"]) == 2
