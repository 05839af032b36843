"""The report's federated wording against the code that trains: a thaw stage's unfreezing is
stated in the unit the training counts (epochs, or a federated arm's rounds), at the epoch or
round its plan starts each group; the per-round loss rows are the folds' round records averaged."""

import pytest

from stagewise.federated.rounds import round_plan
from stagewise.recipe import ArmConfig, parse_stage, strategy_text
from stagewise.report.federated import round_schedule, unfreeze_text
from stagewise.study.summaries import round_losses
from stagewise.training.engine import plan_stage

GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
THAW = {"kind": "thaw", "epochs": 20, "unfreeze": {"layer3": 0.5, "layer4": 0.0}}


def test_a_pooled_thaw_is_stated_in_the_epochs_its_plan_starts_each_group():
    text = unfreeze_text(THAW, federated=False)
    assert text == "layer4 from epoch 1, layer3 from epoch 11 of 20 (unfreeze fractions 0, 0.5 of the stage's epochs)"
    plan = plan_stage(parse_stage(THAW), GROUPS)
    assert [e + 1 for e in range(20) if "layer3" in plan.trainable(e)][0] == 11  # 1-based, as the text counts
    assert "layer4" in plan.trainable(0)


def test_a_federated_thaw_is_stated_in_rounds_where_the_round_plan_starts_each_group():
    stage = {**THAW, "epochs": 2, "rounds": 5}
    text = unfreeze_text(stage, federated=True)
    assert text == "layer4 from round 1, layer3 from round 3 of 5 (unfreeze fractions 0, 0.5 of the stage's rounds)"
    assert round_schedule(stage) == "5 rounds × 2 local epochs per round at each site"
    arm = ArmConfig.model_validate({"name": "f", "backbone": "scratch:resnet18", "sites": {"mode": "federated"},
                                    "stages": [stage]})
    plan = round_plan(arm, GROUPS)
    assert next(r + 1 for _, r, groups in plan if "layer3" in groups) == 3
    assert unfreeze_text({"kind": "probe", "epochs": 3}, federated=False) == ""


@pytest.mark.parametrize("sites, words", [
    ({"strategy": "fedprox", "strategy_params": {"proximal_mu": 0.01}, "bn_stats": "average"},
     "FedProx (proximal_mu 0.01); BatchNorm of the groups that train averaged with their weights"),
    ({"strategy": "fedavg", "strategy_params": {}, "bn_stats": "local"},
     "FedAvg (Flower's default parameters); FedBN: BatchNorm weights and statistics stay at each site"),
    ({"strategy": "fedadam", "bn_stats": "local", "secure_aggregation": {"num_shares": 5, "reconstruction_threshold": 3,
                                                                          "clipping_range": 0.5}},
     "FedAdam (Flower's default parameters); FedBN: BatchNorm weights and statistics stay at each site; secure "
     "aggregation (Flower's SecAgg+: 5 shares, 3 rebuild a secret; each site's change, times its training images / "
     "max_weight 1000, clipped to +-0.5 and quantized to 4194304 levels): the coordinator received no site's model "
     "update, only their masked sum (each site's training loss and number of images still per site)"),
])
def test_the_strategy_in_words(sites, words):
    assert strategy_text(sites) == words


def test_round_loss_rows_are_the_mean_of_the_folds_round_records():
    def rec(t, a, b, mean):
        return {"round": t, "stage": 0, "round_in_stage": t - 1, "trainable": ["head"], "loss": mean,
                "site_loss": {"A": a, "B": b}, "site_examples": {"A": 10, "B": 30}}

    rows = round_losses([(0, 0, [rec(1, 0.7, 0.5, 0.55), rec(2, 0.6, 0.4, 0.45)]),
                         (0, 1, [rec(1, 0.9, 0.3, 0.45)])])  # the second fold lacks round 2
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["sites"] == {"A": pytest.approx(0.8), "B": pytest.approx(0.4)}
    assert rows[0]["loss"] == pytest.approx(0.5) and rows[0]["folds"] == 2
    assert rows[0]["per_fold"] == {"r0-f0": 0.55, "r0-f1": 0.45}
    assert rows[1]["sites"] == {"A": 0.6, "B": 0.4} and rows[1]["folds"] == 1


def test_groups_kept_at_the_sites_and_personalisation_in_words():
    from stagewise.report.federated import personalised_text, round_schedule, shared_groups

    assert strategy_text({"strategy": "fedavg", "bn_stats": "average", "local_groups": ["head"]}).endswith(
        "; head kept at each site, never aggregated (FedPer)")
    assert shared_groups(["layer4", "head"], ["head"]) == "layer4"
    assert shared_groups(["head"], ["head"]) == "none (head trained, kept at each site)"
    assert round_schedule({"kind": "thaw", "site_local": True, "epochs": 3}).startswith(
        "3 epochs at each site alone on its own training rows, after the rounds")
    assert round_schedule({"kind": "probe", "rounds": 2, "epochs": 1}) == "2 rounds × 1 local epoch per round at each site"
    assert personalised_text(None) == ""
    text = personalised_text({"stages": ["2:thaw"], "scored_by_global_model": ["C"]})
    assert "scored by its own model, personalised" in text and "C took no part" in text and "global federated" in text
