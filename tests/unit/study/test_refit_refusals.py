"""A bundle holds one network, the one its card describes: arms whose training gives no single
model (local: one per site; FedBN: BatchNorm stays at each site) are not refit, and no fold
model of a per-site arm is bundled (its fold scores came from the sites' own models)."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import small_recipe
from stagewise.cli import app
from stagewise.errors import RunError
from stagewise.recipe import recipe_to_dict
from stagewise.study.fitting import refit_arm

PROBE = {"kind": "probe", "epochs": 1, "batch_size": 16}
ARMS = [{"name": "loc", "backbone": "scratch:tinycnn", "sites": {"mode": "local"}, "stages": [PROBE]},
        {"name": "fedbn", "backbone": "scratch:tinycnn", "sites": {"mode": "federated", "bn_stats": "local"},
         "stages": [{**PROBE, "rounds": 1}]},
        {"name": "fed", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"}, "stages": [{**PROBE, "rounds": 1}]}]


@pytest.fixture
def recipe(digits_manifest):
    return small_recipe(digits_manifest, ARMS, cohort={"manifest": str(digits_manifest), "site": "patient"})


@pytest.fixture
def run_dir(recipe, tmp_path):
    """A run directory as far as export reads it before training anything."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    (run / "metrics.json").write_text(json.dumps({"arms": {}}))
    return run


def _refused(fn):
    with pytest.raises(RunError) as err:
        fn()
    return str(err.value)


def test_a_local_arm_is_not_refit_and_the_message_says_what_to_export(recipe, tmp_path, monkeypatch):
    import stagewise.study.fitting as fitting

    monkeypatch.setattr(fitting, "Study", lambda *a, **k: pytest.fail("nothing is loaded or trained"))
    text = _refused(lambda: refit_arm(recipe, "loc", tmp_path))
    assert "'loc'" in text and "one model per site" in text and "pooled arm or a federated arm" in text


def test_a_fedbn_arm_is_not_refit_it_has_no_global_model(recipe, tmp_path, monkeypatch):
    import stagewise.study.fitting as fitting

    monkeypatch.setattr(fitting, "Study", lambda *a, **k: pytest.fail("nothing is loaded or trained"))
    text = _refused(lambda: refit_arm(recipe, "fedbn", tmp_path))
    assert "'fedbn'" in text and "bn_stats: local" in text and "no single global model" in text
    assert "sites.bn_stats: average" in text


@pytest.mark.parametrize("args, words", [
    (["--arm", "loc", "--refit"], ["'loc'", "one model per site", "export a pooled arm or a federated arm"]),
    (["--arm", "fedbn", "--refit"], ["'fedbn'", "no single global model"]),
    (["--arm", "fed", "--fold", "r0-f0"], ["'fed'", "its site's final model", "export it with --refit"]),
    (["--arm", "loc", "--fold", "r0-f0"], ["'loc'", "its own site's model", "export a pooled or federated arm"]),
])
def test_export_refuses_before_writing_anything(run_dir, tmp_path, args, words):
    result = CliRunner().invoke(app, ["export", str(run_dir), *args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    for w in words:
        assert w in text, (w, text)
    assert not (tmp_path / "b").exists()
