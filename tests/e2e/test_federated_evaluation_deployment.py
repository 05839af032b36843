"""A federated evaluation of one bundle deployed over the network: Flower's SuperLink and two
hospitals' SuperNodes as separate processes on 127.0.0.1, with TLS and admitted site keys,
each hospital running the evaluation's ClientApp (`federation evaluate-site`'s choice).
Its figures equal those of the same sites' aggregates pooled without Flower."""

import pandas as pd
import pytest

from conftest import free_port, small_recipe
from stagewise.bundle import export_bundle
from stagewise.external.federated_evaluation import APPS, coordinate_evaluation, plan_evaluation
from stagewise.external.federated_results import pool_sites
from stagewise.external.site_summary import EvaluationSite, prepare_site, summarize_site
from stagewise.federated.credentials import make_certificates, make_site_key
from stagewise.federated.launch import start_site
from stagewise.federated.process_tree import stop_process
from stagewise.study import run_study

pytestmark = [pytest.mark.slow, pytest.mark.flower]


def test_a_deployed_evaluation_pools_what_the_sites_computed(digits_manifest, tmp_path):
    recipe = small_recipe(digits_manifest, [{"name": "net", "backbone": "scratch:tinycnn", "stages": [
        {"kind": "probe", "epochs": 2, "batch_size": 16, "lr": 3e-2}]}], protocol={"folds": 2},
        compute={"save_models": True}, evaluation={"saliency": 0, "bootstrap": 0, "report": False})
    run_study(recipe, tmp_path / "run")
    bundle = export_bundle(tmp_path / "run", "net", tmp_path / "bundle", fold="r0-f0")
    table = pd.read_csv(digits_manifest)
    table["path"] = [str(digits_manifest.parent / p) for p in table["path"]]
    patients = table["patient"].unique()
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"])
    sites = {}
    for i, s in enumerate("AB"):
        table[table["patient"].isin(patients[i::2])].to_csv(tmp_path / f"{s}.csv", index=False)
        sites[s] = {"file": prepare_site(bundle, tmp_path / f"{s}.csv", s, tmp_path / f"site-{s}"),
                    **make_site_key(tmp_path / f"keys-{s}", s)}
    folder = plan_evaluation(bundle, tmp_path / "coordinator", sites=2, bootstrap=50, connect_timeout=120, timeout=300)
    port, processes = free_port(), []

    def join(coordinator):
        for s in "AB":
            processes.append(start_site(sites[s]["file"], f"127.0.0.1:{port}", certs["ca"], sites[s]["key"],
                                        port=free_port(), log=tmp_path / f"site-{s}.log", client_app=APPS[1]))

    try:
        results = coordinate_evaluation(folder, certs["ca"].parent, [sites["A"]["pub"], sites["B"]["pub"]], port=port,
                                        timeout=420, on_started=join)
    finally:
        for p in processes:
            stop_process(p)

    direct = {}
    for s in "AB":
        arrays, figures = summarize_site(EvaluationSite.load(sites[s]["file"]), folder.spec()["edges"], 50, 0)
        direct[s] = {"figures": figures, **arrays}
    expected = pool_sites(folder.spec(), direct, {})["pooled"]
    got = results["pooled"]
    assert got["auroc_binned"] == pytest.approx(expected["auroc_binned"])
    assert got["calibration_in_the_large"] == pytest.approx(expected["calibration_in_the_large"])
    assert {k: got["at_threshold"][k] for k in ("tp", "fp", "tn", "fn")} == {
        k: expected["at_threshold"][k] for k in ("tp", "fp", "tn", "fn")}
    assert got["n_patients"] == expected["n_patients"] == len(patients) and got["sites"] == ["A", "B"]
    assert results["sites"]["A"]["figures"]["auroc"] == pytest.approx(direct["A"]["figures"]["auroc"])
    assert "answering the coordinator's evaluate message" in (tmp_path / "site-A.log").read_text()
    wire = (folder.fed / "wire.jsonl").read_text()
    assert str(tmp_path) not in wire and "A.csv" not in wire
