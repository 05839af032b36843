"""Bundles: the exported model reproduces the study's out-of-fold predictions, in ONNX too."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import small_recipe
from stagewise.cli import app
from stagewise.deploy import Bundle, export_bundle
from stagewise.runs import RunError
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
    from stagewise.deploy import load_network

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
    thresholds = [f["threshold"] for f in json.loads((run_dir / "metrics.json").read_text())["arms"]["net"]["folds"]]
    assert info["tasks"][0]["threshold"] == pytest.approx(float(np.median(thresholds)))
    images = sorted((digits_manifest.parent / "images").glob("*.png"))[:3]
    result = runner.invoke(app, ["predict", str(tmp_path / "b"), *map(str, images), "--csv", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == 3


def test_export_without_saved_fold_model_is_a_clear_error(run_dir, tmp_path):
    result = CliRunner().invoke(app, ["export", str(run_dir), "--arm", "net", "--fold", "r9-f9"])
    assert result.exit_code == 2 and "save_models" in result.output and "Traceback" not in result.output
