"""Several outcomes at once, and image features fused with clinical variables."""

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import small_recipe
from stagewise.evaluation.baselines import fold_standardize
from stagewise.models import Network, build_arch
from stagewise.study import run_study
from stagewise.training.objectives import masked_bce

PROBE = {"kind": "probe", "epochs": 3, "batch_size": 16, "lr": 3e-3}


def test_missing_label_gives_its_task_head_no_gradient():
    torch.manual_seed(0)
    net = Network.build(build_arch("scratch:tinycnn"), n_outputs=3, dropout=0.0)
    x = torch.rand(4, 1, 28, 28)
    y = torch.tensor([[1.0, float("nan"), 0.0], [0.0, float("nan"), 1.0], [1.0, float("nan"), float("nan")], [0.0, float("nan"), 1.0]])
    masked_bce(net(x), y).backward()
    w = net.head.layers[-1].weight.grad
    assert torch.all(w[1] == 0) and net.head.layers[-1].bias.grad[1] == 0  # task 2 has no label at all
    assert w[0].abs().sum() > 0 and w[2].abs().sum() > 0


def test_fold_standardization_never_sees_test_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    x[::4, 1] = np.nan
    train = np.arange(20)
    a = fold_standardize(x, train)
    x2 = x.copy()
    x2[20:] = 1e6  # test rows change wildly
    b = fold_standardize(x2, train)
    np.testing.assert_array_equal(a[:20], b[:20])
    np.testing.assert_allclose(np.nanmean(a[train], axis=0), 0, atol=1e-12)  # z-scored on training rows


@pytest.fixture(scope="module")
def multitask_manifest(digits_manifest):
    table = pd.read_csv(digits_manifest)
    rng = np.random.default_rng(0)
    noise = {p: rng.normal() for p in table["patient"].unique()}
    table["same"] = table["outcome"].astype(str)  # a second outcome, partly missing
    table.loc[table["patient"].isin(list(noise)[::5]), "same"] = ""
    table["severity"] = table["patient"].map(noise) + 1.5 * table["outcome"]
    path = digits_manifest.with_name("multitask.csv")
    table.to_csv(path, index=False)
    return path


def test_multitask_and_fusion_arms_report_per_task_metrics(multitask_manifest, tmp_path):
    arms = [{"name": "image", "backbone": "scratch:resnet18", "stages": [PROBE]},
            {"name": "fused", "backbone": "scratch:resnet18", "head": {"fusion": True}, "stages": [PROBE]}]
    recipe = small_recipe(multitask_manifest, arms,
                          cohort={"manifest": str(multitask_manifest), "extra_outcomes": ["same"], "clinical": ["severity"]},
                          evaluation={"saliency": 0, "bootstrap": 100, "report": False})
    result = run_study(recipe, tmp_path / "run")
    arms_out = result.metrics["arms"]
    assert set(arms_out) == {"image", "fused", "clinical"}
    for arm in ("image", "fused"):
        task = arms_out[arm]["tasks"]["same"]["auroc"]
        assert task["n"] == 3 and task["mean"] > 0.7
        assert "prob:same" in result.predictions.columns
    # comparisons: image-only and fused arms against each other and the clinical-only model
    pairs = {(c["a"], c["b"]) for c in result.metrics["evidence"]["comparisons"]}
    assert ("fused", "image") in pairs and ("image", "clinical") in pairs
