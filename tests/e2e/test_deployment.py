"""A federated job deployed over the network: Flower's own SuperLink and SuperNodes as separate
OS processes on 127.0.0.1, with TLS certificates and site keys made by the test.

- the deployment gives the same numbers as the same job in Flower's simulation engine, both
  under secure aggregation (Flower's SecAgg+: the coordinator receives masked vectors only);
- a node whose key the coordinator did not admit is refused;
- only the trainable groups' tensors and scalars cross the wire (the wire log of every message);
- a site killed mid-round is survived when sites.min_sites allows, and said so;
- a coordinator stopped mid-job continues from its last finished round;
- its final global model becomes a bundle (`federation export`) that scores as that model does;
- hospitals that share a linkage key learn how many patients they share, the coordinator never who.
"""

import json
import re
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import free_port
from stagewise.bundle import export_federation_bundle
from stagewise.cli import app
from stagewise.data import load_images
from stagewise.errors import RunError
from stagewise.federated.credentials import make_certificates, make_site_key
from stagewise.federated.deployment import DiskSite, JobDir, JobRefused, simulate_job
from stagewise.federated.launch import Coordinator, prepare_site, start_site
from stagewise.federated.process_tree import stop_process
from stagewise.federated.linkage import linkage_line, shared_patients, write_linkage_key
from stagewise.models import Network, build_arch, load_network

pytestmark = [pytest.mark.slow, pytest.mark.flower]


@pytest.fixture(scope="session")  # a CSV, cheap per xdist worker: the module's tests may spread
def hospitals(digits_manifest, tmp_path_factory):
    """The digits cohort split by patient between two hospitals, each with its own manifest."""
    root = tmp_path_factory.mktemp("hospitals")
    table = pd.read_csv(digits_manifest)
    table["path"] = [str(digits_manifest.parent / p) for p in table["path"]]
    patients = table["patient"].unique()
    out = {}
    for i, site in enumerate("AB"):
        (root / site).mkdir()
        table[table["patient"].isin(patients[i::2])].to_csv(root / site / "manifest.csv", index=False)
        out[site] = root / site / "manifest.csv"
    return root, out, table


def _recipe(folder: Path, stages: list[dict], **sites) -> Path:
    recipe = {"name": "fed", "seed": 0, "cohort": {"manifest": "site.csv"}, "data": {"image_size": 32},
              "protocol": {"folds": 2, "repeats": 1},
              "compute": {"device": "cpu", "precision": "fp32", "channels_last": False},
              "arms": [{"name": "fed", "backbone": "scratch:resnet18", "stages": stages,
                        "sites": {"mode": "federated", "round_timeout": 120, **sites}}]}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _sites(root: Path, recipe: Path, manifests: dict, names: str = "AB", linkage_key: Path | None = None) -> dict:
    out = {}
    for site in names:
        work = root / f"work-{site}"
        out[site] = {"file": prepare_site(recipe, manifests[site if site in manifests else "A"], site, work,
                                          linkage_key=linkage_key), **make_site_key(work / "keys", site)}
    return out


def _command_lines() -> list[list[str]]:
    out = []
    for f in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out.append([a for a in f.read_bytes().decode(errors="replace").split("\0") if a])
        except OSError:
            continue
    return [c for c in out if c]


def _wait_for(condition, timeout: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if value := condition():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _site_check_proves_tls_key_and_manifest(recipe, manifest, site, certs, port, tmp_path, admitted):
    """`federation site --check` against the running coordinator (before its job is submitted):
    every line true of this coordinator; a wrong ca.pem or a port without a coordinator named."""
    from stagewise.federated.connection_check import check_connection
    from stagewise.federated.rounds import FederatedError

    result = CliRunner().invoke(app, ["federation", "site", str(recipe), "--manifest", str(manifest), "--site", "A",
                                      "--server", f"127.0.0.1:{port}", "--ca", str(certs["ca"]), "--key",
                                      str(site["key"]), "--workdir", str(tmp_path / "check-A"), "--check"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text
    for line in ("A: ok: manifest: manifest.csv checked", f"A: ok: connection: 127.0.0.1:{port} reached from here",
                 "A: ok: TLS: the coordinator's certificate is signed by this ca.pem and made for 127.0.0.1",
                 "A: ok: coordinator: a stagewise coordinator's hospitals' listener answers",
                 f"fingerprint {admitted['A']['key']};", "A: ready;"):
        assert line in text, (line, text)
    other = make_certificates(tmp_path / "other-certs", ["127.0.0.1"])
    with pytest.raises(FederatedError, match=rf"TLS: the certificate at 127.0.0.1:{port} is not one this ca.pem"):
        check_connection(f"127.0.0.1:{port}", other["ca"], site["key"])
    closed = free_port()
    with pytest.raises(FederatedError, match=rf"cannot connect to 127.0.0.1:{closed} .*--port {closed}"):
        check_connection(f"127.0.0.1:{closed}", certs["ca"], site["key"])


def test_a_deployment_over_tls_equals_the_simulation_and_admits_only_known_sites(hospitals, tmp_path):
    """The same job (a federated round under secure aggregation, then each site's
    personalisation) gives the same figures in a loopback deployment over TLS and in Flower's
    simulation engine; the coordinator receives masked vectors, never a site's tensors."""
    root, manifests, table = hospitals
    # one federated round (Flower's SecAgg+), then personalisation at each site (site_local: never on the wire)
    recipe = _recipe(tmp_path, [{"kind": "probe", "rounds": 1, "epochs": 1, "batch_size": 16, "lr": 1e-3},
                                {"kind": "probe", "site_local": True, "epochs": 1, "batch_size": 16, "lr": 1e-2}],
                     secure_aggregation=True)
    # C makes a key the coordinator never admits; the deployed hospitals share a linkage key, the rehearsal's do not
    sites = _sites(tmp_path, recipe, manifests, "ABC", linkage_key=write_linkage_key(tmp_path / "linkage.key"))
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"])
    # the rehearsal's sites keep their state in folders of their own: it runs while the deployment does
    rehearsal = {s: prepare_site(recipe, manifests[s], s, tmp_path / f"sim-{s}") for s in "AB"}

    simulated = JobDir(tmp_path / "simulated")
    simulated.write_job(recipe, "fed", sites=2, cv=True, final=False)
    deployed = JobDir(tmp_path / "deployed")
    deployed.write_job(recipe, "fed", sites=2, cv=True, final=False, connect_timeout=120)
    port = free_port()
    coordinator = Coordinator(deployed.path, certs["ca"].parent, port=port,
                              site_keys=[sites["A"]["pub"], sites["B"]["pub"]])
    processes = []
    try:
        coordinator.start()
        # the job's list of admitted sites: A and B by key fingerprint and node, never C
        admitted = deployed.admitted()
        assert sorted(admitted) == ["A", "B"] and all(a["key"].startswith("SHA256:") for a in admitted.values())
        assert str(tmp_path) not in (deployed.fed / "admitted.json").read_text()
        # the hospitals' port serves the Fleet API only: no key can be admitted, no task taken through it
        tls = ssl.create_default_context(cafile=str(certs["ca"]))
        for path in ("/v1/control/register-node", "/v1/control/list-nodes", "/v1/runtime/acquire-task"):
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=b""),
                                       context=tls, timeout=10)
        _site_check_proves_tls_key_and_manifest(recipe, manifests["A"], sites["A"], certs, port, tmp_path, admitted)
        for i, s in enumerate("ABC"):
            processes.append(start_site(sites[s]["file"], f"127.0.0.1:{port}", certs["ca"], sites[s]["key"],
                                        port=free_port(), log=tmp_path / f"site-{s}.log", max_wait=20))
        run_id = coordinator.submit()
        # the ServerApp's per-run token is in a file only its owner reads, not on a command line (`ps`)
        server_app = _wait_for(lambda: [c for c in _command_lines() if any(a.endswith("flwr-serverapp") for a in c[:2])
                                        and f":{coordinator.control_port}" in " ".join(c)], 120, "the ServerApp")
        assert all("--token-file" in c and "--token" not in c for c in server_app), server_app
        # the same job in Flower's simulation engine, while the deployment's processes work
        simulate_job(simulated.path, [rehearsal["A"], rehearsal["B"]])
        status = coordinator.wait(run_id, 420)
        assert status["state"] == "finished", status
        unknown = processes[2]
        assert unknown.wait(90) != 0  # an unknown node is refused and gives up
        assert re.search(r"could not establish|Failed to (activate|initialize)", (tmp_path / "site-C.log").read_text())
    finally:
        for p in processes:
            stop_process(p)
        coordinator.stop()

    for fit in ("r0-f0", "r0-f1"):
        sim = json.loads(simulated.fit_file(fit).read_text())["sites"]
        dep = json.loads(deployed.fit_file(fit).read_text())["sites"]
        assert sorted(dep) == ["A", "B"]  # C never took part
        for site in "AB":
            assert dep[site]["n_test_patients"] == sim[site]["n_test_patients"] > 0
            for k, v in sim[site].items():
                assert dep[site][k] == pytest.approx(v, abs=1e-6), (fit, site, k)
    summary = json.loads((deployed.path / "results.json").read_text())
    assert summary["sites"]["A"]["folds"] == 2 and summary["auroc_across_sites"]["n"] == 2
    # the hospitals' patients were linked (none shared); the rehearsal's sites had no key, and say so
    assert summary["patient_linkage"] == {"checked": True, "patients_at_several_sites": 0, "per_pair": {}}
    unlinked = json.loads((simulated.path / "results.json").read_text())["patient_linkage"]
    assert unlinked["checked"] is False and unlinked["sites_without_linkage_key"] == ["A", "B"]

    # What crossed the wire: a probe round sends the head only, replies scalars and masked vectors only.
    net = Network.build(build_arch("scratch:resnet18"), 1)
    head = {k for k in net.state_dict() if k.startswith("head.")}
    wire = [json.loads(line) for line in (deployed.fed / "wire.jsonl").read_text().splitlines()]
    assert {m["type"] for m in wire} == {"query", "train", "evaluate"}
    arrays = [(name, r) for m in wire for name, r in m.items() if isinstance(r, dict) and "tensors" in r]
    legacy = {str(i) for i in range(len(head))}  # SecAgg+'s FitIns layout: the head's tensors by position
    expected = {"arrays": head, "fitins.parameters": legacy, "fitres.parameters": set()}
    assert arrays and all(set(a["tensors"]) == expected[name] for name, a in arrays), arrays
    assert all(set(m["fitins.config"]["shared-keys"].split(",")) == head for m in wire if "fitins.config" in m)
    arrays = [a for _, a in arrays]
    assert all(a["bytes"] < 3000 for a in arrays)  # 513 float32 values, a few bytes of framing
    up = [m for m in wire if m["direction"] == "up" and m["type"] == "train"]
    assert len(up) == 2 * 2 * 4  # two folds, two sites, SecAgg+'s four stages
    assert all(r["bytes"] == 0 for m in up for r in m.values() if isinstance(r, dict) and "tensors" in r)
    masked = [m["secaggplus_configs"]["masked_params"] for m in up if "masked_params" in m.get("secaggplus_configs", {})]
    assert len(masked) == 4 and all(v["bytes"] > 513 * 4 for v in masked)  # 513 values as 64-bit masked integers
    assert summary["secure_aggregation"]["rounds_aggregated_securely"] == 2
    assert all(r["secure_aggregation"]["num_shares"] == 2 for f in deployed.fed.glob("fits/*.json")
               for r in json.loads(f.read_text())["rounds"])
    for m in wire:
        for name, record in m.items():
            if name.endswith(("config", "metrics", "configs")):  # scalars, node ids, and bytes by their size
                assert all(isinstance(v, (int, float, str, list)) or set(v) <= {"bytes", "items"}
                           for v in record.values()), (name, record)
    shared = (deployed.fed / "wire.jsonl").read_text() + (deployed.path / "results.json").read_text() + "".join(
        p.read_text() for p in (deployed.fed / "fits").glob("*.json"))
    for secret in [str(tmp_path), str(root), *table["patient"].astype(str).unique()[:20],
                   *(Path(p).name for p in table["path"][:20])]:
        assert not re.search(rf"(?<![\w.-]){re.escape(secret)}(?![\w.-])", shared), secret


def test_a_site_lost_mid_round_is_survived_and_a_stopped_coordinator_resumes(hospitals, tmp_path):
    root, manifests, _ = hospitals
    recipe = _recipe(tmp_path, [{"kind": "probe", "rounds": 2, "epochs": 1, "batch_size": 16, "lr": 1e-3}],
                     min_sites=1, round_timeout=60)
    sites = _sites(tmp_path, recipe, manifests)
    job = JobDir(tmp_path / "job")
    job.write_job(recipe, "fed", sites=2, cv=False, final=True, connect_timeout=8)
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"])
    port = free_port()

    def coordinator():
        c = Coordinator(job.path, certs["ca"].parent, port=port, site_keys=[sites["A"]["pub"], sites["B"]["pub"]])
        c.start()
        return c

    first = coordinator()
    nodes = job.admitted()
    a = start_site(sites["A"]["file"], f"127.0.0.1:{port}", certs["ca"], sites["A"]["key"], port=free_port())
    b_log = tmp_path / "site-B.log"
    b = start_site(sites["B"]["file"], f"127.0.0.1:{port}", certs["ca"], sites["B"]["key"], port=free_port(), log=b_log)
    second = None
    try:
        first.submit()
        # B is killed while it trains round 1
        _wait_for(lambda: "answering the coordinator's train message" in b_log.read_text(), 180, "site B in round 1")
        stop_process(b)  # B disconnects mid-round (its SuperNode leaves; a crash is noticed by Flower's heartbeat)
        rounds = job.fed / "rounds" / "final"
        _wait_for(lambda: (rounds / "round-1.json").is_file(), 180, "round 1 to finish without site B")
        stop_process(first.process)  # the coordinator stops mid-job
        with pytest.raises(RunError, match="the job has not finished"):  # no bundle of a model not yet made
            export_federation_bundle(job.path, tmp_path / "early", threshold=0.5)
        second = coordinator()
        status = second.wait(second.submit(), 300)
        assert status["state"] == "finished", status
    finally:
        for p in (a, b):
            stop_process(p)
        for c in (first, second):
            if c is not None:
                c.stop()

    assert sorted(nodes) == ["A", "B"] and job.admitted() == nodes  # the restart found the keys admitted
    fit = json.loads(job.fit_file("final").read_text())
    assert fit["resumed_after_round"] >= 1  # finished rounds were not run again
    assert [r["round"] for r in fit["rounds"]] == [1, 2]
    assert fit["rounds"][0]["sites_replied"] == 1 and fit["rounds"][0]["failures"]
    summary = json.loads((job.path / "results.json").read_text())
    assert summary["rounds_with_missing_sites"] and summary["rounds_with_missing_sites"][0]["round"] == 1
    model = load_network(job.path / summary["model"])
    start = Network.build(build_arch("scratch:resnet18"), 1)
    trained = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    assert not all(np.allclose(v.numpy(), start.state_dict()[k].numpy()) for k, v in trained.items())
    assert all(len(r["site_loss"]) == r["sites_replied"] and set(r["site_loss"]) <= {"A", "B"} for r in fit["rounds"])

    # the coordinator's final model as a bundle: its threshold must come from somewhere stated
    runner = CliRunner()
    refused = runner.invoke(app, ["federation", "export", str(job.path), "-o", str(tmp_path / "bundle")])
    assert refused.exit_code == 2 and "--threshold" in refused.output and not (tmp_path / "bundle").exists()
    made = runner.invoke(app, ["federation", "export", str(job.path), "-o", str(tmp_path / "bundle"), "--threshold", "0.5"])
    assert made.exit_code == 0, made.output
    info = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert info["federation"] == {"job": job.spec()["digest"], "sites": 2, "rounds": 2, "strategy": "fedavg"}
    assert "over 2 sites" in info["source"] and "some rounds completed with 1 of 2 sites" in info["source"]
    files = [str(f) for f in pd.read_csv(manifests["A"])["path"][:4]]
    scored = runner.invoke(app, ["predict", str(tmp_path / "bundle"), *files, "--csv", str(tmp_path / "p.csv")])
    assert scored.exit_code == 0, scored.output
    with torch.no_grad():  # the bundle's scores are the final global model's on the same images
        expected = torch.sigmoid(model.float().eval()(load_images(files, 32).float()))[:, 0].numpy()
    np.testing.assert_allclose(pd.read_csv(tmp_path / "p.csv")["probability:fed"], expected, atol=1e-6)


def test_a_job_that_cannot_be_deployed_and_bad_site_input_get_clear_errors(hospitals, tmp_path):
    from stagewise.federated.job import FederatedJob, SiteConfig
    from stagewise.federated.site_work import SiteWork
    from stagewise.federated.rounds import FederatedError
    from stagewise.recipe import RecipeError, load_recipe

    _, manifests, table = hospitals
    recipe = _recipe(tmp_path, [{"kind": "probe", "rounds": 1, "epochs": 1}])
    with pytest.raises(RecipeError, match="leave_one_site_out is for studies on one machine"):
        FederatedJob.of(load_recipe(recipe, ["protocol.kind=leave_one_site_out", "cohort.site=hospital"]), "fed")
    with pytest.raises(RecipeError, match="no arm 'nope'; its arms are fed"):
        FederatedJob.of(load_recipe(recipe), "nope")
    with pytest.raises(FederatedError, match="site name 'St Mary/ICU'"):
        prepare_site(recipe, manifests["A"], "St Mary/ICU", tmp_path / "w")
    broken = tmp_path / "broken.csv"
    table.head(6).assign(path=lambda t: t["path"].where(t.index != 2, "missing.png")).to_csv(broken, index=False)
    with pytest.raises(Exception, match=r"row 4: missing.png: image file not found"):
        prepare_site(recipe, broken, "A", tmp_path / "w")
    assert not (tmp_path / "w" / "site.json").exists()  # nothing written for a site whose data is wrong

    # a site whose recipe differs (another seed) makes another job and refuses the coordinator's
    site_file = prepare_site(recipe, manifests["A"], "A", tmp_path / "a")
    other = tmp_path / "other"
    other.mkdir()
    changed = _recipe(other, [{"kind": "probe", "rounds": 1, "epochs": 1}])
    changed.write_text(changed.read_text().replace("seed: 0", "seed: 1"))
    theirs = JobDir(tmp_path / "job")
    theirs.write_job(changed, "fed", sites=1)
    work = SiteWork(SiteConfig.load(site_file), "fed")
    assert work.digest() != theirs.spec()["digest"]
    # the site's answer to the coordinator's greeting says, in words, that it refuses and why
    with pytest.raises(JobRefused, match=rf"site A refuses the coordinator's job {theirs.spec()['digest']}: this "
                       rf"site's recipe makes job {work.digest()}"):
        DiskSite(work).greet({"job": theirs.spec()["digest"], "arm": "fed"})
    assert DiskSite(work).greet({"job": work.digest(), "arm": "fed"}) == {"site": "A", "job": work.digest()}
    # and a coordinator refuses to continue a run directory made for another job
    with pytest.raises(FederatedError, match="use a new run directory"):
        theirs.write_job(recipe, "fed", sites=1)
    # a patient in two hospitals' manifests: found from the sites' greetings by keyed hashes, never by id
    key = write_linkage_key(tmp_path / "linkage.key")
    a_rows = pd.read_csv(manifests["A"])
    moved = a_rows[a_rows["patient"].isin(a_rows["patient"].unique()[:2])]
    pd.concat([pd.read_csv(manifests["B"]), moved]).to_csv(tmp_path / "b-with-two-of-a.csv", index=False)
    greetings = {s: DiskSite(SiteWork(SiteConfig.load(prepare_site(recipe, m, s, tmp_path / f"l-{s}", linkage_key=key)),
                                      "fed")).greet({"job": work.digest(), "arm": "fed"})
                 for s, m in (("A", manifests["A"]), ("B", tmp_path / "b-with-two-of-a.csv"))}
    assert not any(str(p) in str(greetings) for p in a_rows["patient"].unique())
    found = shared_patients({s: g["patient-links"].split(",") for s, g in greetings.items()},
                            {s: g["linkage-check"] for s, g in greetings.items()})
    assert found == {"checked": True, "patients_at_several_sites": 2, "per_pair": {"A+B": 2}}
    assert "2 patient(s) appear at more than one site (A+B: 2)" in linkage_line(found)
    with pytest.raises(Exception, match="linkage key .*missing.key"):  # a wrong path: said before any work
        prepare_site(recipe, manifests["A"], "A", tmp_path / "l-x", linkage_key=tmp_path / "missing.key")

    # the site's folds are its own patients, grouped: no patient on both sides of a fold
    for fit in ("r0-f0", "r0-f1"):
        train, test = work.rows(fit)
        assert not set(work.patients[train]) & set(work.patients[test])
        assert set(work.patients[train]) | set(work.patients[test]) == set(work.patients)
