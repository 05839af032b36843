"""TRIPOD+AI items of a real (small) study and of `stagewise evaluate` on its bundle: the
participant flow, the characteristics, the AUROC per subgroup level (equal to roc_auc_score on
the level's patients), the curves' bands; an external site column that groups one patient's
images under several values (a view) validates instead of failing, with the study's subgroups
and baselines."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import small_recipe
from stagewise.bundle import export_bundle
from stagewise.external import ExternalOptions, evaluate_bundle
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 2, "batch_size": 16, "lr": 1e-2}


@pytest.fixture(scope="module")
def cohort(digits_manifest):
    """The digits cohort with a sex (fixed per patient), a view (each patient's two scans: AP, then
    PA), an age, a routine score and three rows without an outcome."""
    t = pd.read_csv(digits_manifest)
    rng = np.random.default_rng(0)
    pids = t["patient"].unique()
    sex = dict(zip(pids, np.where(np.arange(len(pids)) % 2 == 0, "M", "F")))  # 10 with, 10 without the outcome each
    t["sex"] = t["patient"].map(sex)
    t["view"] = np.where(t.groupby("patient").cumcount() == 0, "AP", "PA")
    t["age"] = t["patient"].map(dict(zip(pids, rng.integers(20, 90, len(pids)))))
    t["grade"] = t["outcome"] + t["patient"].map(dict(zip(pids, rng.normal(0, 1, len(pids)))))
    t["outcome"] = t["outcome"].astype(str)
    extra = t.iloc[:3].copy()  # planted: three more images without an outcome (left out by the recipe)
    extra["outcome"] = ""
    extra["path"] = [str((digits_manifest.parent / p).resolve()) for p in extra["path"]]
    extra["patient"] = ["q0", "q1", "q2"]
    t["path"] = [str((digits_manifest.parent / p).resolve()) for p in t["path"]]
    manifest = digits_manifest.with_name("tripod_cohort.csv")
    pd.concat([t, extra]).to_csv(manifest, index=False)
    return manifest


@pytest.fixture(scope="module")
def study(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("tripod")
    recipe = small_recipe(cohort, [{"name": "probe", "backbone": "scratch:tinycnn", "stages": [PROBE]}],
                          cohort={"manifest": str(cohort), "baselines": ["grade"], "drop_missing_outcome": True,
                                  "subgroups": ["sex", "view", {"column": "age", "bands": [50]}]},
                          compute={"save_models": True}, evaluation={"saliency": 0, "bootstrap": 100})
    result = run_study(recipe, out / "run")
    return {"dir": out / "run", "metrics": result.metrics, "bundle": export_bundle(out / "run", "probe", out / "bundle",
                                                                                   fold="r0-f0")}


def test_flow_characteristics_and_subgroup_auroc_of_a_study(study, cohort):
    m = study["metrics"]
    flow = m["cohort"]["flow"]
    assert flow == {"rows_read": 83, "dropped_missing_outcome": 3, "images": 80, "patients": 40}
    assert flow["rows_read"] == flow["dropped_missing_outcome"] + flow["images"]
    sub = m["evidence"]["subgroups"]
    assert set(sub["units"]) == {"probe", "baseline:grade"} and sub["columns"]["view"]["per_image"]
    preds = pd.read_csv(study["dir"] / "predictions.csv")
    preds = preds[preds["arm"] == "probe"]
    sex = pd.read_csv(cohort, dtype=str).set_index("patient")["sex"].groupby(level=0).first()
    for level in ("F", "M"):
        part = preds[preds["patient"].map(sex) == level]
        per_patient = part.groupby("patient").agg(y=("y", "first"), s=("prob", "mean"))  # one repeat: mean of images
        got = sub["units"]["probe"]["sex"][level]
        assert got["n_patients"] == len(per_patient) and got["n_positive"] == per_patient["y"].sum()
        assert got["auroc"]["point"] == pytest.approx(roc_auc_score(per_patient["y"], per_patient["s"]), abs=1e-12)
    curve = m["evidence"]["units"]["probe"]["calibration_curve"]
    assert curve["band_resamples"] == 100 and any(v is not None for v in curve["smooth"]["low"])
    html = (study["dir"] / "report.html").read_text()
    assert '<section id="participants">' in html and '<section id="subgroups">' in html


def test_evaluate_with_a_view_as_its_site_gives_the_studys_subgroups_and_baselines(study, cohort, tmp_path):
    """On main this failed: "patient 'p3_000' appears at several sites" (each patient has an AP and a PA scan)."""
    t = pd.read_csv(cohort, dtype=str, keep_default_na=False)
    t = t[t["outcome"] != ""].assign(projection=lambda d: d["view"])
    manifest = tmp_path / "external.csv"
    t.to_csv(manifest, index=False)
    res = evaluate_bundle(study["bundle"], manifest, tmp_path / "eval", ExternalOptions(site="projection", bootstrap=50))
    ext = res["external"]
    assert set(ext["sites"]) == {"AP", "PA"} and ext["sites_hold_patients"] is False
    assert ext["sites"]["AP"]["n_patients"] == ext["sites"]["PA"]["n_patients"] == 40  # every patient in both views
    patients = pd.read_csv(tmp_path / "eval" / "predictions-patients.csv")
    assert "site" not in patients  # no patient has one site here
    images = pd.read_csv(tmp_path / "eval" / "predictions-images.csv")
    ap = images[images["site"] == "AP"].groupby("patient").agg(y=("y", "first"), s=("probability:probe", "mean"))
    assert ext["sites"]["AP"]["auroc_delong_ci"]["point"] == pytest.approx(roc_auc_score(ap["y"], ap["s"]))
    # the bundle recipe's subgroups and baselines, where the manifest has their columns
    assert set(ext["subgroups"]["columns"]) == {"sex", "view", "age"}
    assert ext["subgroups"]["columns"]["age"]["levels"] == ["< 50", "≥ 50"]
    grade = ext["baselines"]["grade"]
    assert grade["direction_from"] == "development" and grade["direction"] == 1
    assert grade["development"]["n_patients"] == 40 and "model_vs_baseline" in grade
    html = (tmp_path / "eval" / "report.html").read_text()
    for section in ("participants", "subgroups", "baselines"):
        assert f'<section id="{section}">' in html
    assert 'id="sites-note"' in html
    shared = json.dumps(res)
    assert "p3_" not in shared and ".png" not in shared  # counts and levels only, no patient or file
