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
    fit = site_arms.fit_federated(arm, start, images, targets, sites, np.arange(4), np.arange(6), FP32, 0,
                                  targets[:, 0].numpy(), np.arange(6), np.arange(4, 6), "mean")
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


def _crossed_fold(arm, monkeypatch):
    """A fold over sites A, B and C, each with two training and two test rows, under
    `sites.cross_site_evaluation`, the sites' scores stubbed: a site's own model ranks its
    patients right (AUROC 1), another site's model ranks them wrong (AUROC 0)."""
    import stagewise.study.site_arms as site_arms

    torch.manual_seed(0)
    start = Network.build(create_backbone("scratch:tinycnn"), 1)
    sites = np.array(list("AABBCC") * 2)
    targets = torch.tensor([[0.0], [1.0]] * 6)
    y = targets[:, 0].numpy()

    def stub(arm_, start_, partitions, compute, seed):
        out = FederatedResult.starting_from(start_)
        truth = [targets[torch.as_tensor(p.score), 0].numpy()[:, None] for p in partitions]
        out.scores = {k: 0.1 + 0.8 * t for k, t in enumerate(truth)}
        out.cross_scores = {(a, b): 0.9 - 0.8 * t for b, t in enumerate(truth) for a in range(3) if a != b}
        out.cross_site = {"site_model_bytes": {0: 100, 1: 100, 2: 120}, "bytes_down_total": 640}
        return out

    monkeypatch.setattr(site_arms, "run_federated", stub)
    images = ImageSet(torch.rand(12, 1, 32, 32), "t")
    return site_arms.fit_federated(arm, start, images, targets, sites, np.arange(6), np.arange(12), FP32, 0,
                                   y, np.arange(12), np.arange(6, 12), "mean")


PERSONALISED = [ROUNDS, {"kind": "probe", "site_local": True, "epochs": 1}]


def test_the_cross_site_matrix_has_a_row_per_site_model_and_its_diagonal_is_the_site_figures(monkeypatch):
    from stagewise.study.summaries import unit_summary
    from stagewise.study.units import Unit

    arm = _arm(stages=PERSONALISED, cross_site_evaluation=True)
    fit = _crossed_fold(arm, monkeypatch)
    cross = fit.info["cross_site"]
    assert cross["auroc"] == {a: {b: 1.0 if a == b else 0.0 for b in "ABC"} for a in "ABC"}
    assert cross["site_models_left_sites"] is True and cross["site_model_bytes"] == {"A": 100, "B": 100, "C": 120}
    assert fit.prob[6:, 0].tolist() == pytest.approx([0.1, 0.9] * 3)  # the diagonal's scores are the arm's own
    assert set(cross["global_auroc"]) == {"A", "B", "C"} and fit.global_prob.shape == (6, 1)
    folds = [{"repeat": 0, "fold": k, "metrics": {"auroc": 0.5}, "seconds": 1.0, "sites_training": fit.info}
             for k in range(2)]
    summary = unit_summary(Unit("f", "model", arm), folds)["sites_training"]["cross_site"]
    assert summary["auroc"] == cross["auroc"] and summary["folds"] == 2 and summary["site_models_left_sites"]
    assert summary["global_auroc"] == cross["global_auroc"] and summary["bytes_down_per_fold"] == 640


def test_an_arm_that_keeps_groups_at_its_sites_has_no_global_model_to_show(monkeypatch):
    fit = _crossed_fold(_arm(local_groups=["head"], cross_site_evaluation=True), monkeypatch)
    assert "global_auroc" not in fit.info["cross_site"] and fit.global_prob is None
    assert "prob_global" not in fit.with_global_scores(__import__("pandas").DataFrame({"prob": [0.5]}))


def test_without_the_flag_a_fold_records_no_cross_site_matrix(monkeypatch):
    fit, _, _ = _fold(_arm(stages=PERSONALISED), monkeypatch)
    assert "cross_site" not in fit.info and fit.global_prob is None


def test_the_global_models_per_site_figures_come_from_its_own_scores():
    """evidence: `prob_global` (the global model beside a personalised arm's own scores) gives
    that arm's `sites_global_model` figures; an arm without it has none."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from stagewise.evaluation.evidence import global_model_sites, site_evidence

    rng = np.random.default_rng(0)
    y, site = np.arange(40) % 2, np.repeat(["A", "B"], 20)
    own, glob = y + rng.normal(0, 0.3, 40), y + rng.normal(0, 1.0, 40)
    preds = pd.concat([pd.DataFrame({"arm": "f", "repeat": 0, "fold": 0, "patient": np.arange(40), "y": y, "prob": own,
                                     "prob_global": glob, "site": site}),
                       pd.DataFrame({"arm": "g", "repeat": 0, "fold": 0, "patient": np.arange(40), "y": y, "prob": own,
                                     "prob_global": np.nan, "site": site})], ignore_index=True)
    units = {n: {"folds": [{"repeat": 0, "fold": 0, "threshold": 0.5}]} for n in "fg"}
    table = global_model_sites(preds, units, "f", "mean")
    figures = site_evidence(table, preds.groupby("patient")["site"].first(), 50, 0)
    for s in "AB":
        assert figures[s]["auroc_bootstrap_ci"]["point"] == pytest.approx(roc_auc_score(y[site == s], glob[site == s]))
    assert global_model_sites(preds, units, "g", "mean") is None
    assert global_model_sites(preds.drop(columns="prob_global"), units, "f", "mean") is None
