"""A bundle of a deployed federated job's final global model (`stagewise federation export`):
made from a coordinator's run directory laid out as `federated.deployment.run_job` leaves it
(job.json, the fits' records, results.json made by `summarize_job`, status, and the final
model saved by `save_network`), through the same bundle writer as `stagewise export`.
tests/e2e/test_deployment.py makes one from a real loopback deployment."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from stagewise.bundle import Bundle, export_federation_bundle
from stagewise.cli import app
from stagewise.data import load_images
from stagewise.errors import RunError
from stagewise.federated.deployment import JobDir, summarize_job
from stagewise.federated.job import FINAL
from stagewise.models import load_network, save_network

SITES = {"A": {"n_train_patients": 20.0, "n_train_images": 40.0}, "B": {"n_train_patients": 19.0, "n_train_images": 38.0}}


def _recipe(folder, threshold=None):
    protocol = {"folds": 2, "repeats": 1} | ({"threshold": threshold} if threshold is not None else {})
    recipe = {"name": "fed", "seed": 0, "cohort": {"manifest": "site.csv"}, "data": {"image_size": 32},
              "protocol": protocol, "compute": {"device": "cpu", "precision": "fp32", "channels_last": False},
              "arms": [{"name": "fed", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
                        "stages": [{"kind": "probe", "rounds": 2, "epochs": 1, "batch_size": 16}]}]}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _rounds(replied=(2, 1)):
    return [{"round": t, "stage": 0, "round_in_stage": t - 1, "trainable": ["head"], "bytes_down_per_site": 300,
             "bytes_up": [300] * n, "tensor_bytes_per_site": 300, "sites_replied": n, "sites": 2,
             "failures": [] if n == 2 else ["no reply"], "loss": 0.69 - 0.01 * t,
             "site_loss": {s: 0.69 - 0.01 * t for s in "AB"[:n]}, "site_examples": {s: 40 for s in "AB"[:n]}}
            for t, n in enumerate(replied, start=1)]


def _coordinator_dir(tmp_path, threshold=None, cv=True, final=True, finished=True):
    """A coordinator's run directory of a 2-site job, as run_job writes it."""
    folder = tmp_path / "job"
    folder.mkdir()
    job_dir = JobDir(folder)
    job = job_dir.write_job(_recipe(tmp_path, threshold), "fed", sites=2, cv=cv, final=final)
    fits = job.fits()
    for i, fit in enumerate(fits):
        if fit == FINAL:
            if not finished:
                continue
            net = job.start(FINAL)
            with torch.no_grad():  # the aggregated head: not the starting one
                for p in net.head.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
            save_network(net, folder / "model" / "fed.safetensors")
            sites = SITES
        else:
            sites = {s: {"auroc": 0.6 + 0.1 * i + 0.05 * k, "balanced_accuracy": 0.6, "f1": 0.5, "sensitivity": 0.7,
                         "specificity": 0.5, "threshold": 0.42, "n_test_patients": 10.0 - k}
                     for k, s in enumerate("AB")}
        record = {"fit": fit, "resumed_after_round": 0, "sites": sites, "rounds": _rounds(), "full_model_bytes": 5000}
        job_dir.fit_file(fit).parent.mkdir(parents=True, exist_ok=True)
        job_dir.fit_file(fit).write_text(json.dumps(record))
    if finished:
        (folder / "results.json").write_text(json.dumps(summarize_job(job_dir)))
    job_dir.status(state="finished" if finished else "running", run="1", digest=job_dir.spec()["digest"])
    return job_dir


def _images(digits_manifest, n=6):
    table = pd.read_csv(digits_manifest).head(n)
    return [str(digits_manifest.parent / p) for p in table["path"]]


def test_the_bundle_is_the_final_global_model_and_says_what_trained_it(tmp_path, digits_manifest):
    job_dir = _coordinator_dir(tmp_path)
    bundle = Bundle.load(export_federation_bundle(job_dir.path, tmp_path / "bundle", threshold=0.4))

    # its scores are the final global model's on the same images, read as training reads them
    files = _images(digits_manifest)
    model = load_network(job_dir.path / "model" / "fed.safetensors").float().eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(load_images(files, 32).float()))[:, 0].numpy()
    scored = bundle.predict(files)
    np.testing.assert_allclose(scored["probability:fed"], expected, atol=1e-6)
    assert (scored["decision:fed"] == (expected >= 0.4)).all()
    np.testing.assert_allclose(bundle.predict(files, engine="onnx")["probability:fed"], expected, atol=1e-4)

    # what it is: a federated deployment over 2 sites, 2 rounds, FedAvg, and its threshold's source
    task = bundle.info["tasks"][0]
    digest = job_dir.spec()["digest"]
    assert bundle.info["federation"] == {"job": digest, "sites": 2, "rounds": 2, "strategy": "fedavg"}
    assert task["threshold"] == 0.4 and task["training"]["mode"] == "federated" and task["training"]["deployment"]
    words = (f"federated deployment: FedAvg (Flower's default parameters); BatchNorm of the groups that train "
             f"averaged with their weights; over 2 sites (A: 40 images, B: 38 images), 2 rounds (probe 2 rounds × 1 "
             f"local epoch per round), on every image of each site; the model is the coordinator's final global model (job "
             f"{digest}); some rounds completed with 1 of 2 sites")
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert task["training"]["description"] == words == bundle.info["source"] and words in card
    assert "decision threshold 0.4000: given at export (--threshold); not chosen on data by stagewise" in card
    # no training_set.json: the coordinator never saw the sites' images, and the card says so (not "an older bundle")
    assert not (bundle.path / "training_set.json").exists()
    assert ("Training set: not recorded (trained at the sites of a federated deployment, whose images never reached "
            "the coordinator that made this bundle)") in card

    # figures: only the job's own threshold-free cross-validated AUROC, none at a threshold
    results = json.loads((job_dir.path / "results.json").read_text())
    assert task["metrics"] == {"auroc": results["auroc_across_sites"]} and task["n_folds"] == 2
    a = results["sites"]["A"]["auroc"]
    assert f"A {a['mean']:.3f} ± {a['sd']:.3f} (20 test patients)" in card
    assert "at_threshold" not in task and not (bundle.path / "oof.json").exists()
    assert not re.search(r"(sensitivity|specificity|PPV|NPV|balanced accuracy|F1|Brier) \d", card, re.I)
    assert "No sensitivity, specificity, PPV, NPV or calibration at this threshold" in card
    for f in bundle.path.iterdir():  # a bundle leaves the site: no local path
        if f.suffix in (".json", ".yaml", ".md"):
            assert str(tmp_path) not in f.read_text(), f.name


def test_the_recipes_fixed_threshold_is_used_and_named(tmp_path):
    job_dir = _coordinator_dir(tmp_path, threshold=0.3, cv=False)
    bundle = Bundle.load(export_federation_bundle(job_dir.path, tmp_path / "b"))
    task = bundle.info["tasks"][0]
    assert task["threshold"] == 0.3 and task["metrics"] == {} and task["n_folds"] == 0
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert "the recipe's fixed threshold (protocol.threshold: 0.3)" in card
    assert "Not cross-validated: the job trained the final model only" in card and "AUROC" not in card


def test_what_cannot_be_bundled_is_refused_saying_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="not a coordinator's run directory .no job.json.; give the -o folder"):
        export_federation_bundle(tmp_path / "empty", tmp_path / "b", 0.5)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "site.json").write_text("{}")
    with pytest.raises(RunError, match="is a hospital's site folder"):
        export_federation_bundle(tmp_path / "site", tmp_path / "b", 0.5)
    (tmp_path / "r").mkdir()
    running = _coordinator_dir(tmp_path / "r", finished=False)
    with pytest.raises(RunError, match=r"the job has not finished \(state: running\).*run the same `stagewise "
                                       r"federation coordinate"):
        export_federation_bundle(running.path, tmp_path / "b", 0.5)
    (tmp_path / "n").mkdir()
    no_final = _coordinator_dir(tmp_path / "n", final=False)
    with pytest.raises(RunError, match=r"ran without its final fit \(--no-final\)"):
        export_federation_bundle(no_final.path, tmp_path / "b", 0.5)
    (tmp_path / "y").mkdir()
    youden = _coordinator_dir(tmp_path / "y")
    with pytest.raises(RunError, match="by the youden rule on out-of-fold scores.*Give the threshold with --threshold"):
        export_federation_bundle(youden.path, tmp_path / "b")
    with pytest.raises(RunError, match="--threshold 1.5: give a probability between 0 and 1"):
        export_federation_bundle(youden.path, tmp_path / "b", 1.5)
    assert not (tmp_path / "b").exists()  # nothing written for a refusal


def test_the_command_refuses_without_a_threshold_and_its_bundle_predicts(tmp_path, digits_manifest):
    job_dir = _coordinator_dir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["federation", "export", str(job_dir.path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--threshold" in result.output and not (job_dir.path / "bundles").exists()
    result = runner.invoke(app, ["federation", "export", str(job_dir.path), "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    bundle = job_dir.path / "bundles" / "fed"
    result = runner.invoke(app, ["predict", str(bundle), *_images(digits_manifest, 3), "--csv", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == 3
    # `stagewise export` on a coordinator's directory points at this command
    result = runner.invoke(app, ["export", str(job_dir.path), "--arm", "fed", "--refit", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "stagewise federation export" in " ".join(result.output.split())
