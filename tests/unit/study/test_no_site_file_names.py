"""Nothing meant to leave the site carries a file name or folder of the site: a manifest's
name may name a patient (`Smith_John_MRN12345_cohort.csv`), and so may a `file:` backbone's
folder. Checked where they used to appear: MLflow's parameters and artifacts (metrics.json,
report.html), and the exported bundle (recipe.yaml, bundle.json, model card)."""

import json

import pandas as pd
from mlflow.tracking import MlflowClient

from conftest import small_recipe
from stagewise.bundle import export_bundle
from stagewise.models import create_backbone
from stagewise.models.base import save_backbone
from stagewise.study import run_study

SECRETS = ("Smith_John", "MRN12345", "Doe_Jane")


def _leaks(text: str, tmp_path) -> list[str]:
    return [s for s in (*SECRETS, str(tmp_path)) if s in text]


def test_mlflow_the_report_and_the_bundle_carry_no_file_name_of_the_site(digits_manifest, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    table = pd.read_csv(digits_manifest)
    table["path"] = [str(digits_manifest.parent / p) for p in table["path"]]
    manifest = tmp_path / "Smith_John_MRN12345_cohort.csv"
    table.to_csv(manifest, index=False)
    weights = save_backbone(create_backbone("scratch:tinycnn"), tmp_path / "Doe_Jane" / "w.safetensors")
    arms = [{"name": "a", "backbone": f"file:{weights}", "stages": [{"kind": "probe", "epochs": 1, "batch_size": 16}]}]
    recipe = small_recipe(manifest, arms, protocol={"folds": 2}, tracking="mlflow", compute={"save_models": True},
                          evaluation={"saliency": 0, "bootstrap": 0})
    run = tmp_path / "run"
    run_study(recipe, run)
    uri = json.loads((run / "tracking.json").read_text())["uri"]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    params = {k: v for r in runs for k, v in r.data.params.items()}
    assert params and not _leaks(json.dumps(params), tmp_path), _leaks(json.dumps(params), tmp_path)
    artifacts = list((run / "mlartifacts").rglob("*.*"))
    assert {"metrics.json", "report.html"} <= {a.name for a in artifacts}
    for a in artifacts:
        assert not _leaks(a.read_text(errors="ignore"), tmp_path), (a.name, _leaks(a.read_text(errors="ignore"), tmp_path))
    bundle = export_bundle(run, "a", tmp_path / "bundle", fold="r0-f0")
    for f in bundle.rglob("*"):
        if f.suffix in (".yaml", ".json", ".md", ".html"):
            assert not _leaks(f.read_text(errors="ignore"), tmp_path), (f.name, _leaks(f.read_text(errors="ignore"), tmp_path))
