"""What a federated fold with personalisation (`site_local` stages) or groups kept at the
sites (`sites.local_groups`) records and refuses, without a Flower simulation: the held-out
site is scored by the global model and the fold says so; no single model is exported."""

import numpy as np
import pytest
import torch

from stagewise.errors import RunError
from stagewise.federated.rounds import FederatedResult
from stagewise.models import Network, create_backbone
from stagewise.recipe import ArmConfig, ComputeConfig
from stagewise.study.site_arms import export_refusal
from stagewise.training.cache import ImageSet
from stagewise.training.compute import resolve_compute
from stagewise.training.engine import predict

FP32 = resolve_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False))
ROUNDS = {"kind": "probe", "rounds": 1, "epochs": 1}


def _arm(**sites_and_stages) -> ArmConfig:
    stages = sites_and_stages.pop("stages", [ROUNDS])
    return ArmConfig.model_validate({"name": "f", "backbone": "scratch:tinycnn", "stages": stages,
                                     "sites": {"mode": "federated", **sites_and_stages}})


def _fold(arm, monkeypatch):
    """A fold over sites A and B (training rows) and C (test rows only, as the held-out site of
    leave-one-site-out), the sites' scores stubbed: 0.25 at A, 0.75 at B."""
    import stagewise.study.site_arms as site_arms

    torch.manual_seed(0)
    start = Network.build(create_backbone("scratch:tinycnn"), 1)

    def stub(arm_, start_, partitions, compute, seed):
        out = FederatedResult.starting_from(start_)
        out.scores = {k: np.full((len(p.score), 1), 0.25 + 0.5 * k) for k, p in enumerate(partitions)}
        return out

    monkeypatch.setattr(site_arms, "run_federated", stub)
    sites = np.array(list("AABBCC"))
    images, targets = ImageSet(torch.rand(6, 1, 32, 32), "t"), torch.tensor([[0.0], [1.0]] * 3)
    fit = site_arms.fit_federated(arm, start, images, targets, sites, np.arange(4), np.arange(6), FP32, 0)
    return fit, start, images


def test_the_held_out_site_is_scored_by_the_global_model_and_the_fold_says_so(monkeypatch):
    arm = _arm(stages=[ROUNDS, {"kind": "probe", "site_local": True, "epochs": 1}])
    fit, start, images = _fold(arm, monkeypatch)
    assert fit.prob[:4, 0].tolist() == [0.25, 0.25, 0.75, 0.75]  # each site's own (personalised) scores
    server = predict(start, images, np.arange(4, 6), FP32, None)  # the global model (here: the start)
    np.testing.assert_allclose(fit.prob[4:], server, rtol=1e-6)
    assert fit.info["scored_by_server_model"] == ["C"]
    personal = fit.info["personalised"]
    assert personal["stages"] == ["1:probe"] and personal["sites"] == ["A", "B"]
    assert personal["scored_by_global_model"] == ["C"]
    assert "C took no part in training, so has no personalised model" in personal["note"]
    assert fit.server is None  # no single model scored the sites' patients: no Grad-CAM of the global one


def test_groups_kept_at_the_sites_leave_no_model_for_a_site_without_training_rows(monkeypatch):
    with pytest.raises(RunError, match=r"\['C'\] have no training rows.*sites.local_groups"):
        _fold(_arm(local_groups=["head"]), monkeypatch)


@pytest.mark.parametrize("arm, says", [
    (_arm(local_groups=["head"]), "keeps head at each site (sites.local_groups)"),
    (_arm(stages=[ROUNDS, {"kind": "probe", "site_local": True, "epochs": 1}]), "ends with personalisation"),
])
def test_a_per_site_model_is_not_refit_into_one_bundle(arm, says):
    text = export_refusal(arm, refit=True)
    assert text is not None and says in text and "--refit instead" in text


def test_metrics_json_names_the_sites_the_global_model_scored(monkeypatch):
    from stagewise.study.summaries import unit_summary
    from stagewise.study.units import Unit

    arm = _arm(stages=[ROUNDS, {"kind": "probe", "site_local": True, "epochs": 1}])
    fit, _, _ = _fold(arm, monkeypatch)
    folds = [{"repeat": 0, "fold": k, "metrics": {"auroc": 0.5}, "seconds": 1.0, "sites_training": fit.info}
             for k in range(2)]
    summary = unit_summary(Unit("f", "model", arm), folds)["sites_training"]
    assert summary["personalised"]["stages"] == ["1:probe"]
    assert summary["personalised"]["scored_by_global_model"] == ["C"]
    assert summary["personalised"]["notes"] == [fit.info["personalised"]["note"]]
