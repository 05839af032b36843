"""Baselines, the clinical model, label fractions and nested CV run on the study's folds."""

import numpy as np
import pandas as pd
import pytest

from conftest import small_recipe
from stagewise.evaluation.baselines import clinical_model_scores
from stagewise.evaluation.splits import subsample_patients
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 2, "batch_size": 16, "lr": 3e-3}


@pytest.fixture(scope="module")
def clinical_manifest(digits_manifest):
    table = pd.read_csv(digits_manifest)
    rng = np.random.default_rng(0)
    patient_noise = {p: rng.normal() for p in table["patient"].unique()}
    table["perfect"] = -table["outcome"] * 3.0  # lower = positive: orientation comes from training
    table["noise"] = table["patient"].map(patient_noise)
    table["age"] = table["noise"] + table["outcome"] * 2.0
    table.loc[::7, "age"] = np.nan
    path = digits_manifest.with_name("clinical.csv")
    table.to_csv(path, index=False)
    return path


def test_baselines_and_clinical_model_are_units_on_the_same_folds(clinical_manifest, tmp_path):
    recipe = small_recipe(
        clinical_manifest, [{"name": "probe", "backbone": "scratch:tinycnn", "stages": [PROBE]}],
        cohort={"manifest": str(clinical_manifest), "baselines": ["perfect", "noise"], "clinical": ["age"]},
        protocol={"folds": 4, "repeats": 2}, evaluation={"saliency": 0},
    )
    result = run_study(recipe, tmp_path / "run")
    arms = result.metrics["arms"]
    assert arms["baseline:perfect"]["summary"]["auroc"]["mean"] == 1.0
    assert abs(arms["baseline:noise"]["summary"]["auroc"]["mean"] - 0.5) < 0.15
    assert arms["clinical"]["summary"]["auroc"]["mean"] > 0.8
    folds = result.predictions.pivot_table(index=["repeat", "image"], columns="arm", values="fold")
    assert folds.nunique(axis=1).max() == 1  # every unit tested each image in the same fold


def test_clinical_model_never_sees_test_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2))
    x[::5, 0] = np.nan
    y = (x[:, 1] > 0).astype(int)
    patients = np.arange(40)
    train = np.arange(30)
    base = clinical_model_scores(x, y, patients, train, seed=0)
    x2 = x.copy()
    x2[30:] = rng.normal(size=(10, 2)) * 100  # wild test rows: imputation and scaling must not move
    y2 = y.copy()
    y2[30:] = 1 - y2[30:]
    np.testing.assert_allclose(clinical_model_scores(x2, y2, patients, train, seed=0)[:30], base[:30])


def test_label_fraction_keeps_whole_patients_and_both_classes():
    patients = np.repeat(np.arange(50), 3)
    y = (patients < 10).astype(int)
    idx = np.arange(len(patients))
    sub = subsample_patients(idx, y, patients, 0.1, seed=0)
    kept = np.unique(patients[sub])
    assert set(np.unique(y[sub])) == {0, 1}
    assert len(kept) == 5  # 1 of 10 positives, 4 of 40 negatives
    assert all((patients[sub] == p).sum() == 3 for p in kept)


def test_label_fractions_and_nested_tuning_units(digits_manifest, tmp_path):
    arm = {"name": "probe", "backbone": "scratch:tinycnn", "stages": [PROBE],
           "tune": {"grid": {"stages.0.lr": [1e-4, 3e-3]}, "inner_folds": 2}}
    recipe = small_recipe(digits_manifest, [arm], protocol={"folds": 3, "label_fractions": [0.25]},
                          evaluation={"saliency": 2})
    result = run_study(recipe, tmp_path / "run")
    arms = result.metrics["arms"]
    assert set(arms) == {"probe", "probe@0.25"}
    assert arms["probe@0.25"]["label_fraction"] == 0.25
    chosen = arms["probe"]["tuning"]
    assert len(chosen) == 3 and all(c["chosen"]["stages.0.lr"] in (1e-4, 3e-3) for c in chosen)
    assert arms["probe"]["saliency"] and all((tmp_path / "run" / s["file"]).is_file() for s in arms["probe"]["saliency"])
