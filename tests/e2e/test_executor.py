"""Executors without a cluster: the default never imports Ray, the recipe and CLI options
that choose an executor, and errors that can cross a process boundary."""

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stagewise.cli import app
from stagewise.recipe import ComputeConfig, RecipeError

TESTS = Path(__file__).parents[1]  # where conftest.py is


def test_the_default_executor_never_imports_ray(digits_manifest, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        torch.set_num_threads(1)
        from conftest import small_recipe
        from stagewise.study import run_study
        arms = [{{"name": "a", "backbone": "scratch:tinycnn", "stages": [{{"kind": "probe", "epochs": 1, "batch_size": 16}}]}}]
        recipe = small_recipe({str(digits_manifest)!r}, arms, protocol={{"folds": 2}},
                              evaluation={{"saliency": 0, "bootstrap": 0, "report": False}})
        assert recipe.compute.executor == "local"
        result = run_study(recipe, {str(tmp_path / "run")!r})
        assert len(result.metrics["arms"]["a"]["folds"]) == 2
        print("loaded:", sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "stagewise.study.executors"))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded: ['stagewise.study.executors', 'stagewise.study.executors.local']" in done.stdout


def test_compute_executor_settings():
    assert ComputeConfig().executor == "local" and ComputeConfig().address is None
    cfg = ComputeConfig(executor="ray", address="10.0.0.5:6379", cpus_per_task=2, gpus_per_task=0.5)
    assert (cfg.cpus_per_task, cfg.gpus_per_task, cfg.max_retries) == (2, 0.5, 3)
    with pytest.raises(ValueError, match="needs executor: ray"):
        ComputeConfig(address="auto")
    with pytest.raises(ValueError):
        ComputeConfig(executor="dask")


def test_cli_executor_and_address_options_set_the_recipe(tmp_path, monkeypatch):
    import stagewise.cli.study as cli_study  # where `run` looks up _run_recipe

    seen = []
    monkeypatch.setattr(cli_study, "_run_recipe", lambda recipe, out_dir: seen.append(recipe.compute))
    (tmp_path / "m.csv").write_text("path,outcome,patient\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ncohort: {manifest: m.csv}\ncompute: {executor: ray, address: auto}\n"
                      "arms:\n  - {name: a, backbone: 'scratch:tinycnn', stages: [{kind: probe}]}\n")
    runner = CliRunner()
    assert runner.invoke(app, ["run", str(recipe)]).exit_code == 0
    assert runner.invoke(app, ["run", str(recipe), "--address", "127.0.0.1:6379"]).exit_code == 0
    assert runner.invoke(app, ["run", str(recipe), "--executor", "local"]).exit_code == 0
    assert [(c.executor, c.address) for c in seen] == [("ray", "auto"), ("ray", "127.0.0.1:6379"), ("local", None)]
    for bad, message in ((["--executor", "local", "--address", "auto"], "goes with --executor ray"),
                         (["--executor", "spark"], "choose local or ray")):
        result = runner.invoke(app, ["run", str(recipe), *bad])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_errors_a_fit_can_raise_keep_their_type_and_fields_across_processes():
    from stagewise.data import CohortError, ImageReadError
    from stagewise.evaluation.splits import SplitError
    from stagewise.models import BackboneError, WeightsUnavailable
    from stagewise.study.rundir import RunError
    from stagewise.training.engine import StageError

    errors = [CohortError(["row 3: outcome 'maybe'"], "m.csv"), ImageReadError("a.png", "truncated"),
              SplitError("too few"), BackboneError("no such arch"), WeightsUnavailable("offline"),
              StageError("unknown group"), RecipeError("bad field"), RunError("disk full"),
              FloatingPointError("the loss became nan")]
    for err in errors:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        assert vars(back) == vars(err)
