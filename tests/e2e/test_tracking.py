"""MLflow tracking of a study: against a real tracking server started here on 127.0.0.1, and
the default local store inside the run directory. The logged fold metrics equal metrics.json,
a resumed run continues the same MLflow run, and no fold is logged twice."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import StopAfter, free_port, small_recipe, stop_process, wait_healthy
from stagewise.recipe import recipe_from_dict, recipe_to_dict
from stagewise.study.rundir import RunError
from stagewise.study import run_study
from stagewise.study.tracking import STUDY_TAG, log_bundle, tracking_uri

PROBE = {"kind": "probe", "epochs": 2, "batch_size": 16, "lr": 1e-2}
ARMS = [{"name": "probe+a", "backbone": "scratch:resnet18", "stages": [PROBE]}]
SERVER_START_S = 120


@pytest.fixture(scope="module", autouse=True)
def server_process(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts in a temporary
    folder, started when the module starts (it boots while the tests without it run) and
    always torn down."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = folder / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts")],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=folder)
    try:
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def server(server_process):
    """The server's URI, once it answers (bounded in time)."""
    uri, proc, log = server_process
    wait_healthy(uri, proc, log, SERVER_START_S)
    return uri


def _runs(client: MlflowClient, experiment: str) -> dict:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    out = {"study": [], "unit": [], "fold": []}
    for r in runs:
        tags = r.data.tags
        out["study" if tags.get("stagewise.kind") == "study" else "fold" if "stagewise.fold" in tags else "unit"].append(r)
    return out


def _assert_folds_equal_metrics_json(client: MlflowClient, runs: dict, run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    by_fold = {(r.data.tags["stagewise.unit"], r.data.tags["stagewise.fold"]): r for r in runs["fold"]}
    n = 0
    for unit, u in metrics["arms"].items():
        for f in u["folds"]:
            logged = by_fold[unit, f"r{f['repeat']}-f{f['fold']}"].data.metrics
            for key, value in f.items():
                if key in ("repeat", "fold") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                assert logged[key] == value, (unit, f, key)
                n += 1
    assert n >= 3 * 10


def test_local_store_in_the_run_directory_by_default(digits_manifest, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = small_recipe(digits_manifest, ARMS, evaluation={"saliency": 0, "bootstrap": 0, "report": False},
                          tracking="mlflow")
    run_dir = tmp_path / "run"
    run_study(recipe, run_dir)
    uri = json.loads((run_dir / "tracking.json").read_text())["uri"]
    assert uri == f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri)
    runs = _runs(client, "test")
    assert len(runs["study"]) == 1 and len(runs["fold"]) == 3
    _assert_folds_equal_metrics_json(client, runs, run_dir)
    assert (run_dir / "mlartifacts" / runs["study"][0].info.run_id / "artifacts" / "metrics.json").is_file()


def test_tracking_is_off_by_default_and_an_unreachable_server_stops_before_anything_is_written(
        digits_manifest, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    plain = small_recipe(digits_manifest, ARMS)
    assert tracking_uri(plain, tmp_path) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(plain, tmp_path) == "http://127.0.0.1:5999"
    off = recipe_from_dict(recipe_to_dict(plain) | {"tracking": False})
    assert tracking_uri(off, tmp_path) is None
    with pytest.raises(RunError, match="does not answer"):
        run_study(small_recipe(digits_manifest, ARMS, tracking={"uri": f"http://127.0.0.1:{free_port()}"}),
                  tmp_path / "run")
    assert not (tmp_path / "run" / "recipe.yaml").exists() and not (tmp_path / "run" / "folds").exists()


def test_server_tracking_resumes_the_same_mlflow_run_without_duplicate_folds(server, digits_manifest, tmp_path):
    recipe = small_recipe(digits_manifest, ARMS, evaluation={"saliency": 0, "bootstrap": 0},
                          tracking={"uri": server, "experiment": "resume"})
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_study(recipe, run_dir, StopAfter(2))  # two folds finished and written, then Ctrl-C
    client = MlflowClient(tracking_uri=server)
    first = _runs(client, "resume")
    assert len(first["study"]) == 1 and first["study"][0].info.status == "KILLED"
    assert len(first["fold"]) == 1  # the second fold was written but interrupted before it was logged
    run_study(recipe, run_dir)
    runs = _runs(client, "resume")
    assert [r.info.run_id for r in runs["study"]] == [first["study"][0].info.run_id]  # the same MLflow run
    assert runs["study"][0].info.status == "FINISHED"
    assert len(runs["unit"]) == 1 and len(runs["fold"]) == 3  # every fold once
    assert {r.data.tags["mlflow.parentRunId"] for r in runs["fold"]} == {runs["unit"][0].info.run_id}
    assert runs["unit"][0].data.tags["mlflow.parentRunId"] == runs["study"][0].info.run_id
    assert all(r.data.tags[STUDY_TAG] == runs["study"][0].info.run_id for r in runs["unit"] + runs["fold"])
    _assert_folds_equal_metrics_json(client, runs, run_dir)
    # per-epoch losses and learning rates, as the fold records hold them
    fold = next(r for r in runs["fold"] if r.data.tags["stagewise.fold"] == "r0-f2")
    record = json.loads((run_dir / "folds" / "probe+a" / "r0-f2.json").read_text())
    losses = [m.value for m in sorted(client.get_metric_history(fold.info.run_id, "loss"), key=lambda m: m.step)]
    assert losses == [e["loss"] for e in record["stages"][0]["epochs"]]
    assert [m.value for m in client.get_metric_history(fold.info.run_id, "lr.head")] == [1e-2, 1e-2]
    # parameters: the resolved recipe without local folders, backbone source, compute
    params = runs["study"][0].data.params
    assert params["recipe.arms.0.backbone.name"] == "scratch:resnet18" and params["backbone.probe_a.source"] == "scratch"
    assert params["recipe.cohort.manifest"] == "(a file at the site)"  # no file name of the site leaves it
    assert params["compute.resolved"].startswith("cpu")
    assert not any(str(tmp_path) in v or str(digits_manifest.parent) in v for v in params.values())
    summary = runs["study"][0].data.metrics
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert summary["probe_a.auroc_mean"] == metrics["arms"]["probe+a"]["summary"]["auroc"]["mean"]
    # artifacts: metrics.json, report.html and predictions.csv without image paths or patient ids
    study_id = runs["study"][0].info.run_id
    assert {"metrics.json", "report.html", "predictions.csv"} <= {a.path for a in client.list_artifacts(study_id)}
    shared = pd.read_csv(client.download_artifacts(study_id, "predictions.csv", str(tmp_path)))
    assert "image" not in shared and "patient" not in shared and len(shared) == 80
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    assert log_bundle(run_dir, bundle)
    assert [a.path for a in client.list_artifacts(study_id, "bundles/bundle")] == ["bundles/bundle/bundle.json"]
