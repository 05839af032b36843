"""A federated arm with DP-SGD at each site (`sites.privacy`) in a study: the epsilon each
site spent, by Opacus' accountant from the steps its replies recorded, in metrics.json and
the report beside the AUROC."""

import json

import pytest

from conftest import small_recipe
from test_deployment import _recipe, hospitals  # noqa: F401 - two hospitals, each with its own manifest
from test_federated import QUIET
from stagewise.study import run_study
from stagewise.training.privacy_budget import epsilon_spent

pytestmark = pytest.mark.flower  # its Flower simulation shares the worker's Ray instance (conftest)


def test_a_dp_arm_reports_each_sites_epsilon_beside_its_auroc(sites_manifest, tmp_path):
    probe = {"kind": "probe", "epochs": 1, "batch_size": 16, "lr": 3e-3, "rounds": 2}
    arms = [{"name": "dp", "backbone": "scratch:tinycnn", "stages": [probe],
             "sites": {"mode": "federated", "privacy": {"noise_multiplier": 0.8, "clip": 1.0, "delta": 1e-5}}}]
    recipe = small_recipe(sites_manifest, arms, protocol={"folds": 2}, evaluation={**QUIET, "report": True},
                          cohort={"manifest": str(sites_manifest), "site": "hospital"})
    run = tmp_path / "run"
    result = run_study(recipe, run)
    privacy = result.metrics["arms"]["dp"]["sites_training"]["privacy"]
    assert set(privacy["sites"]) == {"A", "B", "C"} and privacy["delta"] == 1e-5 and privacy["unit"] == "image"
    for split in ("r0-f0", "r0-f1"):  # each fold's epsilon is the accountant's over the steps the site recorded
        fold = json.loads((run / "folds" / "dp" / f"{split}.json").read_text())["sites_training"]
        for site, p in fold["privacy"]["sites"].items():
            steps = [r["site_privacy"][site] for r in fold["rounds"]]
            assert [s["noise_multiplier"] for s in steps] == [0.8, 0.8] and p["steps"] == sum(s["steps"] for s in steps)
            assert p["epsilon"] == pytest.approx(epsilon_spent(
                [(0.8, s["sample_rate"], s["steps"]) for s in steps], 1e-5))
    site = privacy["sites"]["A"]
    assert site["epsilon_max"] == max(site["epsilon_per_fold"]) > 0
    assert site["statement"].startswith(f"epsilon {site['epsilon_max']:.3g} at delta 1e-05")
    assert site["meaningful"] == (site["epsilon_max"] <= 100)
    report = (run / "report.html").read_text()
    assert 'class="fed-privacy"' in report and site["statement"] in report
    assert "DP-SGD per image (Opacus): gradients clipped to L2 norm 1.000" in report and "AUROC over all sites" in report


@pytest.mark.slow
def test_a_deployed_jobs_results_hold_each_sites_epsilon_for_the_folds_and_the_final_model(hospitals, tmp_path):  # noqa: F811
    from stagewise.federated.deployment import JobDir, simulate_job
    from stagewise.federated.launch import prepare_site

    _, manifests, _ = hospitals
    recipe = _recipe(tmp_path, [{"kind": "probe", "rounds": 1, "epochs": 1, "batch_size": 16, "lr": 1e-3}],
                     privacy={"noise_multiplier": 1.1})
    job = JobDir(tmp_path / "job")
    job.write_job(recipe, "fed", sites=2, cv=True, final=True)
    simulate_job(job.path, [prepare_site(recipe, manifests[s], s, tmp_path / f"work-{s}") for s in "AB"])
    results = json.loads((job.path / "results.json").read_text())["privacy"]
    assert set(results["sites"]) == {"A", "B"} and len(results["sites"]["A"]["epsilon_per_fold"]) == 2
    final = results["final_model"]["sites"]
    for site in "AB":
        record = json.loads(job.fit_file("final").read_text())["rounds"][0]["site_privacy"][site]
        assert final[site]["epsilon"] == pytest.approx(epsilon_spent([(1.1, record["sample_rate"], record["steps"])],
                                                                     1e-5))
        assert final[site]["epsilon"] > 0 and final[site]["statement"].startswith("epsilon ")

