"""Every number a bundle quotes is true: a federated arm's refit is federated (Flower's
simulation engine over every image of each site; the bundle is the final global model), the
bundle says how its model was trained, and the figures of its own decision rule (the
cross-validated models' scores at its threshold) are stored, shown and served."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import small_recipe
from stagewise.bundle import Bundle, export_bundle
from stagewise.data.image_digest import image_fingerprints, salted_digest
from stagewise.evaluation.statistics import bootstrap_metrics
from stagewise.evaluation.thresholds import threshold_for
from stagewise.federated.simulation import run_federated
from stagewise.federated.site import SitePartition
from stagewise.recipe import recipe_from_dict
from stagewise.study import SilentReporter, Study, run_study
from stagewise.study.rundir import RunDir
from stagewise.training.cache import ImageSet
from stagewise.training.start import start_network

pytestmark = pytest.mark.flower  # its Flower simulations share one Ray instance (conftest)

PROBE = {"kind": "probe", "epochs": 1, "batch_size": 16, "lr": 3e-3}
QUIET = {"saliency": 0, "bootstrap": 50, "report": False}
FIGURES = ("sensitivity", "specificity", "ppv", "npv", "balanced_accuracy")


@pytest.fixture(scope="module")
def run_dir(sites_manifest, tmp_path_factory):
    """A study of a federated and a pooled arm on the digits cohort spread over three hospitals."""
    folder = tmp_path_factory.mktemp("refit")
    arms = [{"name": "fed", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
             "stages": [{**PROBE, "rounds": 2}]},
            {"name": "pooled", "backbone": "scratch:tinycnn", "stages": [PROBE]}]
    recipe = small_recipe(sites_manifest, arms, protocol={"folds": 2}, evaluation=QUIET,
                          cohort={"manifest": str(sites_manifest), "site": "hospital"})
    run_study(recipe, folder / "run")
    return folder / "run"


def test_a_federated_refit_is_the_final_global_model_of_federated_training_on_every_image(run_dir, tmp_path,
                                                                                           monkeypatch):
    import stagewise.study.fitting as fitting

    def central(*args, **kwargs):
        raise AssertionError("a federated arm's refit must not train centrally")

    monkeypatch.setattr(fitting, "train_fold", central)
    bundle = Bundle.load(export_bundle(run_dir, "fed", tmp_path / "fed", refit=True))

    # the same federated training, by hand: one partition per hospital, every row a training row
    recipe = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    arm = next(a for a in recipe.arms if a.name == "fed")
    study = Study(recipe, RunDir(run_dir), SilentReporter())
    sites = study.cohort.table["site"].astype(str).to_numpy()
    partitions = []
    for site in dict.fromkeys(sites):
        rows = np.flatnonzero(sites == site)
        partitions.append(SitePartition(site, ImageSet(study.images.x[torch.as_tensor(rows)], f"check:{site}"),
                                        study.targets[torch.as_tensor(rows)], np.arange(len(rows)), np.arange(0)))
    start = start_network(arm, study.pristine(arm), study.targets.shape[1], recipe.seed)
    result = run_federated(arm, start, partitions, study.compute_for(arm), recipe.seed)
    assert len(result.rounds) == 2 and all(r["sites_replied"] == 3 for r in result.rounds)

    expected = result.global_state
    got = {**{f"backbone.{k}": v for k, v in bundle.model.backbone.state_dict().items()},
           **{f"head.{k}": v for k, v in bundle.model.heads["fed"].state_dict().items()}}
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k].float(), expected[k].float(), rtol=0, atol=1e-6, msg=k)
    trained = [k for k in expected if not torch.equal(expected[k], start.state_dict()[k])]
    assert trained and all(k.startswith("head.") for k in trained)  # a probe: the aggregated head only

    task = bundle.info["tasks"][0]
    assert task["training"]["mode"] == "federated" and task["training"]["sites"] == 3
    words = "federated: FedAvg over 3 sites, 2 rounds, on every image of each site"
    assert words in task["training"]["description"] and words in bundle.info["source"]
    assert words in (bundle.path / "MODEL_CARD.md").read_text()
    # its training set is every image of every site, under the bundle's salt
    record = json.loads((bundle.path / "training_set.json").read_text())
    prints = image_fingerprints(study.cohort.table["path"].tolist())
    assert record["pixel_digests"] == sorted(salted_digest(record["salt"], "pixels", d) for d, _ in prints)
    assert bundle.info["training_set"]["images"] == 80 and bundle.info["training_set"]["patients"] == 40


def test_a_pooled_refit_says_pooled(run_dir, tmp_path):
    bundle = Bundle.load(export_bundle(run_dir, "pooled", tmp_path / "pooled", refit=True))
    task = bundle.info["tasks"][0]
    assert task["training"]["mode"] == "pooled" and "pooled: trained centrally on every image" in bundle.info["source"]
    assert "federated" not in (bundle.path / "MODEL_CARD.md").read_text()


def test_figures_at_the_bundles_threshold_are_the_out_of_fold_scores_decided_there(run_dir, tmp_path):
    from fastapi.testclient import TestClient

    from stagewise.serve import create_app

    folder = export_bundle(run_dir, "pooled", tmp_path / "b", refit=True)
    info = json.loads((folder / "bundle.json").read_text())
    oof = json.loads((folder / "oof.json").read_text())["outputs"]["pooled"]["patients"]
    task = info["tasks"][0]
    at = task["at_threshold"]
    threshold = task["threshold"]
    rule = json.loads((run_dir / "metrics.json").read_text())["protocol"]["threshold"]
    # the protocol's rule applied to these out-of-fold patient scores (a refit has no patient left to choose on)
    assert at["threshold"] == threshold == pytest.approx(threshold_for(oof["label"], oof["score"], rule))

    # oof.json's patient scores are the study's out-of-fold predictions, one per patient
    preds = pd.read_csv(run_dir / "predictions.csv")
    preds = preds[preds["arm"] == "pooled"]
    per_patient = preds.groupby("patient").agg(y=("y", "first"), prob=("prob", "mean"))
    assert oof["n"] == at["n_patients"] == len(per_patient)
    np.testing.assert_allclose(oof["score"], np.sort(per_patient["prob"].to_numpy()), atol=1e-6)
    assert sum(oof["label"]) == at["n_positive"] == int(per_patient["y"].sum())

    # recomputed from oof.json at the bundle's threshold
    y, s = np.asarray(oof["label"]), np.asarray(oof["score"])
    again = bootstrap_metrics(y, s, np.arange(len(y)), threshold, n_boot=50, seed=0)
    decided = s >= threshold
    assert at["sensitivity"]["point"] == pytest.approx(decided[y == 1].mean())
    assert at["specificity"]["point"] == pytest.approx((~decided[y == 0]).mean())
    for m in FIGURES:
        for k in ("point", "low", "high"):
            stored = np.nan if at[m][k] is None else at[m][k]  # undefined (PPV with no positive decision): null
            assert stored == pytest.approx(again[m][k], nan_ok=True), (m, k)
    assert at["counts"]["tp"] == int((decided & (y == 1)).sum())

    card = (folder / "MODEL_CARD.md").read_text()
    assert f"At this bundle's threshold {threshold:.4f}" in card and "cross-validated models' out-of-fold scores" in card
    assert f"sensitivity {at['sensitivity']['point']:.3f}" in card
    assert "at each fold's own threshold" in card

    served = TestClient(create_app(folder)).get("/model-card").json()["outputs"][0]
    assert served["at_threshold"] == at
    assert served["training"].startswith("pooled: trained centrally")
