"""A deployed job whose sites keep their own models (personalisation stages, groups kept at
each site) has no coordinator's model that its figures describe: export refuses it, saying so,
before reading any model file."""

import re
from types import SimpleNamespace

import pytest

import stagewise.bundle.federation as federation
from stagewise.errors import RunError
from stagewise.recipe import ArmConfig

ROUNDS = {"kind": "probe", "rounds": 1, "epochs": 1}


@pytest.mark.parametrize("sites, stages, says", [
    ({"local_groups": ["head"]}, [ROUNDS], "keeps head at each site (sites.local_groups)"),
    ({}, [ROUNDS, {"kind": "probe", "site_local": True, "epochs": 1}], "ends with personalisation (site_local"),
])
def test_export_refuses_a_job_of_per_site_models(sites, stages, says, monkeypatch, tmp_path):
    arm = ArmConfig.model_validate({"name": "f", "backbone": "scratch:tinycnn", "stages": stages,
                                    "sites": {"mode": "federated", **sites}})
    folder = SimpleNamespace(job=lambda: SimpleNamespace(recipe=None, arm=arm))
    monkeypatch.setattr(federation, "finished_job", lambda job_dir: (folder, {}, {}))
    monkeypatch.setattr(federation, "load_network", lambda path: pytest.fail("no model is read"))
    with pytest.raises(RunError, match=re.escape(says)):
        federation.export_federation_bundle(tmp_path / "job", tmp_path / "bundle", threshold=0.5)
