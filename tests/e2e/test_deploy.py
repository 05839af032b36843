"""Bundles: the exported model reproduces the study's out-of-fold predictions, in ONNX too."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import small_recipe
from stagewise.cli import app
from stagewise.evaluation.thresholds import threshold_for
from stagewise.bundle import Bundle, export_bundle
from stagewise.study.rundir import RunError
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 2, "batch_size": 16, "lr": 3e-3}
THAW = {"kind": "thaw", "epochs": 1, "batch_size": 16, "unfreeze": {"layer4": 0.0}, "lr": 1e-3}


@pytest.fixture(scope="module")
def run_dir(digits_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "run"
    arms = [{"name": "net", "backbone": "scratch:resnet18", "stages": [PROBE, THAW]},
            {"name": "probe-a", "backbone": "scratch:resnet18", "stages": [PROBE]},
            {"name": "probe-b", "backbone": "scratch:resnet18", "head": {"hidden": 16}, "stages": [{**PROBE, "lr": 1e-2}]}]
    recipe = small_recipe(digits_manifest, arms,
                          compute={"save_models": True}, evaluation={"saliency": 0, "bootstrap": 0, "report": False})
    run_study(recipe, out)
    return out


def test_bundle_reproduces_out_of_fold_predictions(run_dir, tmp_path):
    bundle_dir = export_bundle(run_dir, "net", tmp_path / "bundle", fold="r0-f1")
    for name in ("backbone.safetensors", "heads.safetensors", "model.onnx", "bundle.json", "recipe.yaml", "MODEL_CARD.md"):
        assert (bundle_dir / name).is_file()
    oof = pd.read_csv(run_dir / "predictions.csv")
    oof = oof[(oof["arm"] == "net") & (oof["fold"] == 1)]
    bundle = Bundle.load(bundle_dir)
    torch_pred = bundle.predict(oof["image"].tolist())
    np.testing.assert_allclose(torch_pred["probability:net"], oof["prob"], atol=1e-5)
    fold_threshold = json.loads((run_dir / "folds" / "net" / "r0-f1.json").read_text())["metrics"]["threshold"]
    assert (torch_pred["decision:net"] == (oof["prob"].to_numpy() >= fold_threshold)).all()
    onnx_pred = bundle.predict(oof["image"].tolist(), engine="onnx")
    np.testing.assert_allclose(onnx_pred["probability:net"], torch_pred["probability:net"], atol=1e-4)


def test_shared_backbone_bundle_equals_each_head_on_its_own_model(run_dir, tmp_path):
    from stagewise.models import load_network

    bundle = Bundle.load(export_bundle(run_dir, ["probe-a", "probe-b"], tmp_path / "shared", fold="r0-f0"))
    assert len(bundle.model.heads) == 2  # one backbone, two heads
    images = pd.read_csv(run_dir / "predictions.csv")["image"].unique()[:6].tolist()
    shared = bundle.predict(images)
    x = bundle.images(images).float()
    for arm in ("probe-a", "probe-b"):
        own = load_network(run_dir / "folds" / arm / "r0-f0.safetensors").float().eval()
        with torch.no_grad():
            alone = torch.sigmoid(own(x))[:, 0].numpy()
        np.testing.assert_allclose(shared[f"probability:{arm}"], alone, atol=1e-6)
    with pytest.raises(RunError, match="do not share one backbone"):
        export_bundle(run_dir, ["net", "probe-a"], tmp_path / "bad", fold="r0-f0")


def test_refit_bundle_and_cli_predict(run_dir, tmp_path, digits_manifest):
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run_dir), "--arm", "net", "--refit", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "b" / "bundle.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    oof = json.loads((tmp_path / "b" / "oof.json").read_text())["outputs"]["net"]["patients"]
    # the protocol's rule on the arm's out-of-fold patient scores (no patient is left to choose on for a refit)
    expected = threshold_for(oof["label"], oof["score"], metrics["protocol"]["threshold"])
    assert info["tasks"][0]["threshold"] == pytest.approx(expected)
    assert "[stagewise] epoch 1/" in result.output and "ETA" in result.output  # export --refit shows progress
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    for fact in ("Intended use: research", "randomly initialised (no pretrained weights)",
                 f"chosen on the arm's cross-validated out-of-fold scores ({oof['n']} patients",
                 "a refit has no held-out patients",
                 f"{metrics['cohort']['patients']} patients, {metrics['cohort']['positive_patients']} positive (prevalence"):
        assert fact in card, fact
    assert "Calibration" in card and "held out" not in card
    images = sorted((digits_manifest.parent / "images").glob("*.png"))[:3]
    result = runner.invoke(app, ["predict", str(tmp_path / "b"), *map(str, images), "--csv", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == 3


def test_export_of_a_missing_fold_lists_the_folds_that_exist(run_dir, tmp_path):
    result = CliRunner().invoke(app, ["export", str(run_dir), "--arm", "net", "--fold", "r9-f9", "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "no fold 'r9-f9'" in result.output and "r0-f0, r0-f1, r0-f2" in result.output
    assert "save_models" not in result.output  # it was set: the fold does not exist


def test_bundle_carries_no_paths_or_file_names_and_ordinary_permissions(run_dir, tmp_path, digits_manifest):
    bundle = export_bundle(run_dir, "net", tmp_path / "bundle", fold="r0-f0")
    images = {p.name for p in (digits_manifest.parent / "images").glob("*.png")}
    fold = next(f for f in json.loads((run_dir / "metrics.json").read_text())["arms"]["net"]["folds"]
                if (f["repeat"], f["fold"]) == (0, 0))
    card = (bundle / "MODEL_CARD.md").read_text()  # this fold's held-out figures, not the study mean
    assert (f"This model (fold r0-f0), on the {fold['n_test_patients']} patients its fold held out: "
            f"AUROC {fold['auroc']:.3f}, balanced accuracy {fold['balanced_accuracy']:.3f}") in card
    where = {"inner_cv": "the inner out-of-fold scores of the training part",
             "training": "the training part's own scores"}[fold["threshold_on"]]
    assert f"youden, chosen on {where} (fold r0-f0)" in card
    for f in bundle.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name
        if f.suffix in (".json", ".yaml", ".md"):
            text = f.read_text()
            assert str(tmp_path.parent) not in text and str(digits_manifest.parent) not in text, f.name
            assert not any(name in text for name in images), f.name


def test_interrupted_re_export_leaves_the_old_bundle_whole(run_dir, tmp_path, monkeypatch):
    import stagewise.bundle.export

    target = export_bundle(run_dir, "net", tmp_path / "bundle", fold="r0-f0")
    before = {f.name: f.read_bytes() for f in target.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stagewise.bundle.export, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(run_dir, "net", target, fold="r0-f1")
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no partial folder left behind
    monkeypatch.undo()
    export_bundle(run_dir, "net", target, fold="r0-f1")  # a completed re-export replaces it whole
    assert json.loads((target / "bundle.json").read_text())["source"].endswith("r0-f1")


def test_export_refuses_a_foreign_folder(run_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(RunError, match="not a stagewise bundle"):
        export_bundle(run_dir, "net", tmp_path / "mine", fold="r0-f0")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_weights_that_do_not_fit_the_architecture_are_named(run_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from stagewise.bundle.integrity import BundleError

    bundle = export_bundle(run_dir, "net", tmp_path / "bundle", fold="r0-f0")
    state = load_file(str(bundle / "backbone.safetensors"))
    state["layer4.0.conv1.weight"] = state["layer4.0.conv1.weight"][:, :3].contiguous()
    save_file(state, str(bundle / "backbone.safetensors"), metadata={"stagewise_arch": "scratch:resnet18"})
    with pytest.raises(BundleError, match=r"backbone\.safetensors differs from the file exported"):
        Bundle.load(bundle)  # the digest recorded at export sees the change first
    info = json.loads((bundle / "bundle.json").read_text())
    del info["integrity"]  # a bundle from before the digests: the weights' own check names the tensor
    (bundle / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match=r"backbone\.safetensors.*layer4\.0\.conv1\.weight"):
        Bundle.load(bundle)


def test_predict_scores_the_readable_files_and_names_the_others(run_dir, tmp_path, digits_manifest):
    import nibabel

    bundle = export_bundle(run_dir, "net", tmp_path / "bundle", fold="r0-f0")
    good = sorted((digits_manifest.parent / "images").glob("*.png"))[:2]
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    nibabel.save(nibabel.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    files = [good[0], tmp_path / "broken.png", tmp_path / "vol.nii.gz", good[1]]
    table = Bundle.load(bundle).predict(files)
    assert table["probability:net"].notna().tolist() == [True, False, False, True]
    assert "3D volume" in table["error"][2] and table["error"][0] is None
    result = CliRunner().invoke(app, ["predict", str(bundle), *map(str, files)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "broken.png" in result.output and "vol.nii.gz" in result.output and "cohort" not in result.output
    folder = CliRunner().invoke(app, ["predict", str(bundle), str(good[0].parent), "--csv", str(tmp_path / "all.csv")])
    assert folder.exit_code == 0 and len(pd.read_csv(tmp_path / "all.csv")) == len(list(good[0].parent.glob("*.png")))


def test_bundle_records_the_intensity_convention_and_an_old_bundle_says_it_is_older(run_dir, tmp_path, digits_manifest):
    from stagewise.data.readers import INTENSITY_CONVENTION

    bundle_dir = export_bundle(run_dir, "net", tmp_path / "bundle", fold="r0-f0")
    info = json.loads((bundle_dir / "bundle.json").read_text())
    assert info["intensity"]["convention"] == INTENSITY_CONVENTION == "storable-range-v1"
    assert "BitsStored" in info["intensity"]["description"]
    assert f"intensities in [0, 1] by `{INTENSITY_CONVENTION}`: integer pixels" in (bundle_dir / "MODEL_CARD.md").read_text()
    assert Bundle.load(bundle_dir).intensity_notice is None
    images = sorted((digits_manifest.parent / "images").glob("*.png"))[:2]
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(bundle_dir), *map(str, images)])
    assert result.exit_code == 0 and "intensity convention" not in result.output
    # a bundle from before the field: loads, scores, and says in a sentence that it is older
    del info["intensity"], info["integrity"]  # nor the digests of its files
    (bundle_dir / "bundle.json").write_text(json.dumps(info))
    old = Bundle.load(bundle_dir)
    assert old.intensity_notice.startswith("This bundle was made with the earlier intensity convention (DICOM scaled by "
                                           "each image's own minimum and maximum)")
    assert old.predict(images)["error"].isna().all()
    result = runner.invoke(app, ["predict", str(bundle_dir), *map(str, images)])
    assert result.exit_code == 0, result.output
    assert "earlier intensity convention" in " ".join(result.output.split())
