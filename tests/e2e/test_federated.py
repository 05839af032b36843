"""Sites in a study: local and federated (Flower simulation) arms on the same folds as pooled."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import small_recipe
from stagewise.federated.sharing import FROM_START, START_SHA256, from_start_of, group_keys, shared_keys, state_digest, tensor_bytes
from stagewise.federated.simulation import FederatedError, run_federated
from stagewise.federated.site import SitePartition, SiteTrainer
from stagewise.federated.wire import LAYOUT, unpacked
from stagewise.models import Network, build_arch
from stagewise.recipe import ArmConfig
from stagewise.study import run_study
from stagewise.training.cache import ImageSet
from stagewise.training.compute import resolve_compute
from stagewise.recipe import ComputeConfig

pytestmark = pytest.mark.flower  # its Flower simulations share one Ray instance (conftest)

FP32 = resolve_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False))
QUIET = {"saliency": 0, "bootstrap": 50, "report": False}


def _net(arch="scratch:resnet18"):
    torch.manual_seed(0)
    return Network.build(build_arch(arch), 1)


def test_a_probe_round_shares_the_head_only_and_a_thaw_round_adds_layer4():
    net = _net()
    state = net.state_dict()
    head = [k for k in state if k.startswith("head.")]
    assert shared_keys(net, ["head"], "average") == head
    probe_bytes = tensor_bytes({k: state[k] for k in head})
    assert probe_bytes == (512 + 1) * 4  # one Linear(512 -> 1) in float32
    thaw = shared_keys(net, ["layer4", "head"], "average")
    assert {k.split(".")[2] for k in thaw if k.startswith("backbone.")} == {"layer4"}
    assert any("running_mean" in k for k in thaw)  # BatchNorm statistics travel with their weights
    fedbn = shared_keys(net, ["layer4", "head"], "local")
    assert not any("bn" in k or "downsample.1" in k for k in fedbn)  # FedBN: no BatchNorm tensor leaves a site
    assert shared_keys(net, ["layer4", "head"], "average", ["head"]) == [k for k in thaw if not k.startswith("head.")]
    assert shared_keys(net, ["layer4", "head"], "local", ["head"]) == [k for k in fedbn if not k.startswith("head.")]
    assert shared_keys(net, ["head"], "average", ["head"]) == []  # FedPer's probe round: nothing travels
    assert tensor_bytes({k: state[k] for k in thaw}) < tensor_bytes(state)
    every = [k for g in group_keys(net).values() for k, _ in g]
    assert len(every) == len(set(every))  # each tensor belongs to one group


def _partition(images, targets, rows, site):
    return SitePartition(site, ImageSet(images.x[torch.as_tensor(rows)], f"t:{site}"), targets[torch.as_tensor(rows)],
                         np.arange(len(rows)), np.arange(len(rows)))


def _digits(manifest, n=24):
    from stagewise.data import load_images

    table = pd.read_csv(manifest).head(n)
    x = load_images(table["path"].tolist(), 32)
    return ImageSet(x, "digits"), torch.tensor(table[["outcome"]].to_numpy(), dtype=torch.float32)


def test_frozen_groups_stay_bit_identical_at_every_site(sites_manifest):
    images, targets = _digits(sites_manifest)
    arm = ArmConfig.model_validate({"name": "f", "backbone": "scratch:resnet18", "sites": {"mode": "federated"},
                                    "stages": [{"kind": "thaw", "rounds": 2, "epochs": 1, "batch_size": 8,
                                                "unfreeze": {"layer4": 0.0}, "bn": "adapt"}]})
    start = _net()
    before = {k: v.clone() for k, v in start.state_dict().items()}
    for site, rows in (("A", np.arange(0, 12)), ("B", np.arange(12, 24))):
        trainer = SiteTrainer(_partition(images, targets, rows, site), arm, start, FP32, seed=0)
        received = {k: before[k] for k in shared_keys(start, ["layer4", "head"], "average")}
        sent, state, n, loss, _ = trainer.train_round(received, None, 0, 0, ["layer4", "head"])
        assert set(sent) == set(received) and n == 12
        frozen_params = {name for g in ("stem", "layer1", "layer2", "layer3")
                         for name, is_bn in group_keys(start)[g] if not name.endswith(("running_mean", "running_var"))}
        assert all(torch.equal(state[k], before[k]) for k in frozen_params)
        assert not all(torch.equal(state[k], before[k]) for k in sent)  # the shared groups did train


def test_a_round_runs_its_part_of_the_stages_schedule_when_the_schedule_spans_the_rounds(sites_manifest, monkeypatch):
    """`sites.lr_schedule: across_rounds`: round r of a stage's n rounds trains with part r of n
    of the stage's LR schedule; by default each round runs the whole schedule."""
    import stagewise.federated.site as site_module

    images, targets = _digits(sites_manifest)
    parts, fit = [], site_module.fit_stage
    monkeypatch.setattr(site_module, "fit_stage", lambda *a, **k: parts.append(k["schedule_part"]) or fit(*a, **k))
    start, sent = _net(), {}
    received = {k: v.clone() for k, v in start.state_dict().items() if k.startswith("head.")}
    for schedule in ("each_round", "across_rounds"):
        arm = ArmConfig.model_validate({"name": "f", "backbone": "scratch:resnet18",
                                        "sites": {"mode": "federated", "lr_schedule": schedule},
                                        "stages": [{"kind": "probe", "rounds": 3, "epochs": 1, "batch_size": 8,
                                                    "schedule": "onecycle"}]})
        trainer = SiteTrainer(_partition(images, targets, np.arange(12), "A"), arm, start, FP32, seed=0)
        sent[schedule] = trainer.train_round(received, None, 0, 1, ["head"])[0]
    assert parts == [(0, 1), (1, 3)]
    assert not torch.equal(sent["each_round"]["head.layers.1.weight"], sent["across_rounds"]["head.layers.1.weight"])


def test_each_site_trains_on_its_own_rows_only(sites_manifest, monkeypatch):
    import stagewise.study.site_arms

    seen = {}

    def capture(arm, start, partitions, compute, seed):
        for p in partitions:
            seen[p.site] = p
        raise RuntimeError("captured")

    monkeypatch.setattr(stagewise.study.site_arms, "run_federated", capture)
    images, targets = _digits(sites_manifest, 30)
    sites = pd.read_csv(sites_manifest).head(30)["hospital"].to_numpy()
    arm = ArmConfig.model_validate({"name": "f", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
                                    "stages": [{"kind": "probe", "rounds": 1, "epochs": 1}]})
    train, test = np.arange(0, 20), np.arange(20, 30)
    with pytest.raises(RuntimeError, match="captured"):
        stagewise.study.site_arms.fit_federated(arm, _net("scratch:tinycnn"), images, targets, sites, train,
                                                np.concatenate([train, test]), FP32, 0, targets[:, 0].numpy(),
                                                np.arange(30), test, "mean")
    assert sorted(seen) == sorted(set(sites[train]))
    for site, p in seen.items():
        own_train = train[sites[train] == site]
        own_test = test[sites[test] == site]
        assert torch.equal(p.images.x[torch.as_tensor(p.train)], images.x[torch.as_tensor(own_train)])
        assert torch.equal(p.images.x, images.x[torch.as_tensor(np.concatenate([own_train, own_test]))])
        assert torch.equal(p.images.x[torch.as_tensor(p.score)], images.x[torch.as_tensor(np.concatenate([own_train, own_test]))])


def test_fedavg_with_one_site_equals_local_training(sites_manifest, tmp_path):
    table = pd.read_csv(sites_manifest)
    table["hospital"] = "A"
    table.to_csv(tmp_path / "one.csv", index=False)
    probe = {"kind": "probe", "epochs": 2, "batch_size": 16, "lr": 3e-3}
    arms = [{"name": "local", "backbone": "scratch:tinycnn", "sites": {"mode": "local"}, "stages": [probe]},
            {"name": "fed", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
             "stages": [{**probe, "rounds": 1}]}]
    recipe = small_recipe(tmp_path / "one.csv", arms, protocol={"folds": 2}, evaluation=QUIET,
                          cohort={"manifest": str(tmp_path / "one.csv"), "site": "hospital"})
    result = run_study(recipe, tmp_path / "run")
    p = result.predictions
    np.testing.assert_allclose(p[p["arm"] == "fed"]["prob"].to_numpy(), p[p["arm"] == "local"]["prob"].to_numpy(),
                               atol=1e-5)


@pytest.fixture(scope="module")
def three_modes(sites_manifest, tmp_path_factory):
    """One study of a pooled, a local and a federated (FedProx, under secure aggregation) arm on
    the same folds, with its report and Grad-CAM maps: the run directory and the study's result."""
    probe = {"kind": "probe", "epochs": 1, "batch_size": 16, "lr": 3e-3}
    thaw = {"kind": "thaw", "epochs": 1, "batch_size": 16, "lr": 1e-3, "unfreeze": {"block3": 0.5}}
    arms = [{"name": "pooled", "backbone": "scratch:tinycnn", "stages": [probe, thaw]},
            {"name": "local", "backbone": "scratch:tinycnn", "sites": {"mode": "local"}, "stages": [probe, thaw]},
            {"name": "fed", "backbone": "scratch:tinycnn", "sites": {"mode": "federated", "strategy": "fedprox",
                                                                    "strategy_params": {"proximal_mu": 0.01},
                                                                    "secure_aggregation": True},
             "stages": [{**probe, "rounds": 2}, {**thaw, "rounds": 2}]}]
    recipe = small_recipe(sites_manifest, arms, protocol={"folds": 2},
                          evaluation={**QUIET, "report": True, "saliency": 4},
                          cohort={"manifest": str(sites_manifest), "site": "hospital"})
    out = tmp_path_factory.mktemp("three-modes") / "run"
    return out, run_study(recipe, out)


def test_federated_and_local_arms_on_the_same_folds_with_sites_and_bytes(three_modes):
    run_dir, result = three_modes
    m = result.metrics["arms"]
    tested = {a: sorted(result.predictions[result.predictions["arm"] == a]["patient"]) for a in m}
    assert tested["pooled"] == tested["local"] == tested["fed"]  # the same patients for every mode
    assert set(m["fed"]["sites"]) == {"A", "B", "C"} and m["fed"]["training"] == "federated"
    rounds = m["fed"]["sites_training"]["rounds"]
    assert [sorted(r["trainable"]) for r in rounds] == [["head"], ["head"], ["head"], ["block3", "head"]]
    assert rounds[0]["bytes_down_per_site"] < rounds[3]["bytes_down_per_site"]
    assert m["fed"]["sites_training"]["bytes_per_fold"] < m["fed"]["sites_training"]["bytes_full_model_fedavg_per_fold"]
    assert set(m["local"]["sites_training"]["cross_site_auroc"]) == {"A", "B", "C"}
    secure = m["fed"]["sites_training"]["secure_aggregation"]  # Flower's SecAgg+ in every round of both folds
    assert secure["protocol"] == "SecAgg+ (Flower)" and secure["rounds_aggregated_securely"] == 2 * 4
    assert secure["clipping_range"] == 8.0 and 0 < secure["largest_error_bound"] < 1e-3
    assert set(result.metrics["evidence"]["units"]["fed"]["sites"]) == {"A", "B", "C"}
    report = (run_dir / "report.html").read_text()
    assert 'id="fig-sites"' in report and 'id="site-training-table"' in report and "MB per fold" in report
    # the local arm's cross-site AUROC as a matrix: a row per site model, its own site's cell marked
    assert report.count('class="cross-site-matrix" data-unit="local" data-kind="local"') == 1
    assert report.count('data-own="1"') == 3 and 'data-kind="federated"' not in report  # fed has no cross-site flag


def _fold_rounds(run_dir):
    """Each fold's recorded round records of the federated arm (folds/fed/<split>.json)."""
    return {p.stem: json.loads(p.read_text())["sites_training"]["rounds"] for p in sorted((run_dir / "folds" / "fed").glob("r*-f*.json"))}


def test_every_round_records_each_sites_loss_and_their_weighted_mean(three_modes):
    run_dir, result = three_modes
    folds = _fold_rounds(run_dir)
    assert len(folds) == 2
    for split, rounds in folds.items():
        n_train = json.loads((run_dir / "folds" / "fed" / f"{split}.json").read_text())["n_train_images"]
        for r in rounds:
            assert set(r["site_loss"]) == {"A", "B", "C"} == set(r["site_examples"])
            assert sum(r["site_examples"].values()) == n_train  # every training image, each at its own site
            weighted = np.average([r["site_loss"][s] for s in "ABC"], weights=[r["site_examples"][s] for s in "ABC"])
            assert r["loss"] == pytest.approx(weighted, rel=1e-6)


def test_the_reports_federated_part_states_the_recipes_strategy_and_rounds_and_the_recorded_losses(three_modes):
    from stagewise.report.context import build_context
    from stagewise.report.formatting import fmt_num

    run_dir, result = three_modes
    ctx = build_context(run_dir)
    (panel,) = ctx["federated"]
    assert panel["unit"] == "fed" and panel["sites"] == ["A", "B", "C"]
    assert panel["strategy"].startswith("FedProx (proximal_mu 0.01); BatchNorm of the groups that train averaged")
    assert "; secure aggregation (Flower's SecAgg+: shares among every site of a round" in panel["strategy"]
    assert [s["schedule"] for s in panel["stages"]] == ["2 rounds × 1 local epoch per round at each site"] * 2
    assert panel["stages"][1]["unfreeze"] == "block3 from round 2 of 2 (unfreeze fractions 0.5 of the stage's rounds)"
    # the table: one row per recorded round, its groups, and each loss the mean over the folds' round files
    folds = list(_fold_rounds(run_dir).values())
    assert [r["round"] for r in panel["rows"]] == [1, 2, 3, 4] == [r["round"] for r in folds[0]]
    for i, row in enumerate(panel["rows"]):
        assert row["groups"] == ", ".join(folds[0][i]["trainable"])
        assert row["sites"] == [fmt_num(np.mean([f[i]["site_loss"][s] for f in folds])) for s in "ABC"]
        assert row["loss"] == fmt_num(np.mean([f[i]["loss"] for f in folds]))
    assert panel["figure"].startswith("data:image/png;base64,")
    page = (run_dir / "report.html").read_text()
    assert '<section id="federated">' in page and 'class="round-loss" data-unit="fed"' in page
    assert ("federated", "Federated training") in ctx["nav"]

    # the checklist: the strategy, rounds and local epochs of the federated arm; unfreezing in its own unit
    items = {c["topic"]: c["lines"] for c in ctx["checklist_auto"]}
    (fed,) = items["Federated training"]
    assert fed.startswith("fed: FedProx (proximal_mu 0.01); BatchNorm") and "4 rounds over 3 sites (A, B, C)" in fed
    assert "the coordinator received no site's model update, only their masked sum" in fed
    assert "stage 1 (probe) 2 rounds × 1 local epoch per round at each site" in fed
    training = items["Training and stopping rule"]
    assert any(line.startswith("fed, stage 2 (thaw): 2 rounds × 1 local epoch per round at each site, batch 16")
               and line.endswith("block3 from round 2 of 2 (unfreeze fractions 0.5 of the stage's rounds)")
               for line in training)
    assert any(line.startswith("pooled, stage 2 (thaw): 1 epoch,") and
               line.endswith("block3 from epoch 1 of 1 (unfreeze fractions 0.5 of the stage's epochs)") for line in training)
    assert not any("fraction of the stage's epochs" in line or line.startswith("fed, stage 2 (thaw): 1 epoch,")
                   for line in training)


def test_grad_cam_maps_of_the_federated_arm_come_from_the_final_global_model_at_each_site(three_modes):
    from stagewise.report.context import build_context

    run_dir, result = three_modes
    maps = result.metrics["arms"]["fed"]["saliency"]
    assert maps and {m["site"] for m in maps} == {"A", "B", "C"}  # every site's own test images
    thresholds = {f"r0-f{f['fold']}": f["threshold"] for f in result.metrics["arms"]["fed"]["folds"]}
    for m in maps:
        assert m["model"] == "final global model" and (run_dir / m["file"]).is_file()
        split = m["file"].rsplit("/", 1)[-1].split("-row")[0]
        assert m["correct"] == ((m["prob"] >= thresholds[split]) == bool(m["y"]))
    ctx = build_context(run_dir)
    (fed,) = [s for s in ctx["saliency"] if s["unit"] == "fed"]
    shown = [it for g in fed["groups"] for it in g["items"]]
    assert len(shown) == len(maps) and all(it["src"] for it in shown)
    assert all(", site " in it["where"] and "final global model" in it["where"] for it in shown)
    lines = {c["topic"]: c["lines"] for c in ctx["checklist_auto"]}["Failure analysis"]
    assert any(line.endswith("wrong test images of fed (the final global model of each fold's federated training, "
                             "on test images of each site)") for line in lines)


def test_leave_one_site_out_with_federated_training_on_the_other_sites(sites_manifest, tmp_path):
    arms = [{"name": "fed", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
             "stages": [{"kind": "probe", "rounds": 1, "epochs": 1, "batch_size": 16}]}]
    recipe = small_recipe(sites_manifest, arms, protocol={"kind": "leave_one_site_out"}, evaluation=QUIET,
                          cohort={"manifest": str(sites_manifest), "site": "hospital"})
    result = run_study(recipe, tmp_path / "run")
    folds = result.metrics["arms"]["fed"]["folds"]
    assert len(folds) == 3 and all(len(f["sites"]) == 1 for f in folds)  # each fold tests one held-out site


def test_a_failing_site_is_survived_when_the_minimum_allows(sites_manifest):
    images, targets = _digits(sites_manifest)
    stage = {"kind": "probe", "rounds": 2, "epochs": 1, "batch_size": 8}
    good = _partition(images, targets, np.arange(0, 12), "A")
    broken = SitePartition("B", good.images, good.targets, np.arange(0), np.arange(12))  # no rows: its loss is NaN
    arm = ArmConfig.model_validate({"name": "f", "backbone": "scratch:tinycnn", "stages": [stage],
                                    "sites": {"mode": "federated", "min_sites": 1}})
    result = run_federated(arm, _net("scratch:tinycnn"), [good, broken], FP32, 0)
    assert all(r["sites_replied"] == 1 and r["failures"] for r in result.rounds)
    strict = arm.model_copy(update={"sites": arm.sites.model_copy(update={"min_sites": 2})})
    with pytest.raises(FederatedError, match="1 of 2 sites replied"):
        run_federated(strict, _net("scratch:tinycnn"), [good, broken], FP32, 0)


def test_bad_strategy_parameters_are_caught_before_training(sites_manifest):
    from stagewise.recipe import RecipeError

    arms = [{"name": "fed", "backbone": "scratch:tinycnn",
             "sites": {"mode": "federated", "strategy": "fedprox", "strategy_params": {"proximal_nu": 0.1}},
             "stages": [{"kind": "probe", "rounds": 1}]}]
    with pytest.raises(RecipeError, match=r"arms.0.sites \(arm .*\): strategy_params.proximal_nu: fedprox has no parameter"):
        small_recipe(sites_manifest, arms, cohort={"manifest": str(sites_manifest), "site": "hospital"})


def test_per_site_arms_need_a_site_column_and_rounds(sites_manifest):
    from stagewise.study.preflight import StudyCheckError, check_study
    from stagewise.recipe import RecipeError, recipe_from_dict

    base = {"name": "r", "cohort": {"manifest": str(sites_manifest)}}
    fed = {"name": "f", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"}, "stages": [{"kind": "probe"}]}
    no_site = recipe_from_dict(base | {"arms": [{**fed, "stages": [{"kind": "probe", "rounds": 2}]}]})
    with pytest.raises(StudyCheckError, match="cohort.site names no site column"):  # a study needs it; a deployment site does not
        check_study(no_site)
    with_site = base | {"cohort": {"manifest": str(sites_manifest), "site": "hospital"}}
    with pytest.raises(RecipeError, match="needs `rounds`"):
        recipe_from_dict(with_site | {"arms": [fed]})
    with pytest.raises(RecipeError, match="only a federated arm"):
        recipe_from_dict(with_site | {"arms": [{**fed, "sites": {"mode": "pooled"}, "stages": [{"kind": "probe", "rounds": 2}]}]})


def _messages(seen, direction, kind, node):
    """The audited messages of one node, one direction and one kind (train, evaluate), in order."""
    end = "dst_node_id" if direction == "down" else "src_node_id"
    return [m for d, m in seen
            if d == direction and m.metadata.message_type == kind and getattr(m.metadata, end) == node]


PERSONALISE = {"kind": "thaw", "site_local": True, "epochs": 1, "batch_size": 8, "lr": 1e-2, "unfreeze": {"layer4": 0.0}}


def test_groups_kept_at_each_site_never_travel_and_each_site_scores_with_its_own(sites_manifest):
    """FedPer with FedBN, then personalisation: the head stays at each site
    (`sites.local_groups: [head]`) and so does BatchNorm, and a `site_local` stage fine-tunes
    layer4 and the head at each site after the rounds. No message carries the head or
    BatchNorm, and nothing of the personalisation (its final message up holds scores only);
    each site's rounds, replayed here from the messages it received, give exactly what it
    sent and its own head, which differs from the other site's; its final scores are those of
    its own model personalised on its own rows (not what it would score without that stage)."""
    images, targets = _digits(sites_manifest)
    arm = ArmConfig.model_validate({"name": "f", "backbone": "scratch:resnet18",
                                    "sites": {"mode": "federated", "local_groups": ["head"], "bn_stats": "local"},
                                    "stages": [{"kind": "probe", "rounds": 1, "epochs": 1, "batch_size": 8},
                                               {"kind": "thaw", "rounds": 2, "epochs": 1, "batch_size": 8,
                                                "unfreeze": {"layer4": 0.0}}, PERSONALISE]})
    unpersonalised = arm.model_copy(update={"stages": arm.stages[:2]})
    start = _net()
    parts = [_partition(images, targets, np.arange(0, 12), "A"), _partition(images, targets, np.arange(12, 24), "B")]
    seen = []
    result = run_federated(arm, start, parts, FP32, 0, on_message=lambda d, m: seen.append((d, m)))
    head = {k for k in start.state_dict() if k.startswith("head.")}
    layer4 = set(shared_keys(start, ["layer4"], "local"))
    assert layer4 and not any("bn" in k or "downsample.1" in k for k in layer4)
    train_down = [m for d, m in seen if d == "down" and m.metadata.message_type == "train"]
    # the first thaw round's layer4 is still the starting weights each site holds: named, not sent
    assert [set(unpacked(m)["arrays"]) for m in train_down] == [set(), set(), set(), set(), layer4, layer4]
    assert [bool(from_start_of(m.content["config"])[0]) for m in train_down] == [False, False, True, True, False, False]
    assert all(set(from_start_of(m.content["config"])[0]) == layer4 for m in train_down[2:4])
    assert all(set(unpacked(m)["arrays"]) <= layer4 for _, m in seen if "arrays" in m.content.keys())
    assert [r["tensor_bytes_per_site"] for r in result.rounds][0] == 0  # the probe round shares nothing
    assert len(result.rounds) == 3  # the site_local stage is no round
    assert {m.metadata.message_type for _, m in seen} == {"train", "evaluate"}  # no cross-site evaluation asked
    assert not any("site_model" in m.content.keys() for _, m in seen)  # so no site model ever leaves its site
    final_up = [m for d, m in seen if d == "up" and m.metadata.message_type == "evaluate"]
    assert len(final_up) == 2 and all(set(unpacked(m).keys()) == {"scores", "metrics"} for m in final_up)
    node = {int(m.content["metrics"]["partition"]): m.metadata.src_node_id for d, m in seen if d == "up"}
    heads, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as each simulated site trains
    try:
        for k, part in enumerate(parts):
            trainer, state = SiteTrainer(part, arm, start, FP32, seed=0), None
            for down, up in zip(_messages(seen, "down", "train", node[k]), _messages(seen, "up", "train", node[k]),
                                strict=True):
                c = down.content["config"]
                sent, state, *_ = trainer.train_round(unpacked(down)["arrays"].to_torch_state_dict(), state,
                                                        int(c["stage"]), int(c["round"]), str(c["trainable"]).split(","),
                                                        from_start=from_start_of(c))
                got = unpacked(up)["arrays"].to_torch_state_dict()
                assert set(got) == set(sent) and all(torch.equal(got[key], sent[key]) for key in got)
            heads[part.site] = {key: state[key] for key in head}
            (final,) = _messages(seen, "down", "evaluate", node[k])
            final = unpacked(final)["arrays"].to_torch_state_dict()
            np.testing.assert_allclose(result.scores[k], trainer.scores(final, state), rtol=0, atol=1e-6)
            plain = SiteTrainer(part, unpersonalised, start, FP32, seed=0).scores(final, state)
            assert np.abs(result.scores[k] - plain).max() > 1e-4  # personalised at the site
    finally:
        torch.set_num_threads(threads)
    assert not all(torch.equal(heads["A"][key], heads["B"][key]) for key in head)  # each site trained its own
    assert all(torch.equal(result.global_state[key], start.state_dict()[key]) for key in head)  # the server has none


def test_only_trainable_tensors_and_scalars_cross_the_wire(sites_manifest):
    """Every Flower message of a federated fold, as the server sends and receives it."""
    images, targets = _digits(sites_manifest)
    table = pd.read_csv(sites_manifest).head(24)
    private = {*map(str, table["patient"]), *(p.rsplit("/", 1)[-1] for p in table["path"]), str(sites_manifest.parent)}
    arm = ArmConfig.model_validate({"name": "f", "backbone": "scratch:resnet18", "sites": {"mode": "federated"},
                                    "stages": [{"kind": "probe", "rounds": 1, "epochs": 1, "batch_size": 8},
                                               {"kind": "thaw", "rounds": 1, "epochs": 1, "batch_size": 8,
                                                "unfreeze": {"layer4": 0.0}}]})
    start = _net()
    parts = [_partition(images, targets, np.arange(0, 12), "A"), _partition(images, targets, np.arange(12, 24), "B")]
    seen = []
    run_federated(arm, start, parts, FP32, 0, on_message=lambda d, m: seen.append((d, m)))
    head = set(shared_keys(start, ["head"], "average"))
    layer4 = set(shared_keys(start, ["layer4", "head"], "average"))
    train_down = [m for d, m in seen if d == "down" and m.metadata.message_type == "train"]
    # tensors still at the starting weights (the probe's head, then the thaw's layer4) are named, not sent
    assert [set(unpacked(m)["arrays"]) for m in train_down] == [set(), set(), head, head]
    assert [set(from_start_of(m.content["config"])[0]) for m in train_down] == [head, head, layer4 - head, layer4 - head]
    digest = state_digest(start.state_dict())
    assert all(from_start_of(m.content["config"])[1] == digest for m in train_down)
    for direction, m in seen:
        content = m.content  # as it crossed: tensors packed, their layout beside them
        assert set(content.keys()) <= {"arrays", "config", "metrics", "scores", LAYOUT}
        for key in content.keys():
            record = content[key]
            if key in ("config", "metrics"):  # scalars only: counts, losses, round numbers, group names
                assert all(isinstance(v, (int, float, str)) for v in record.values())
                texts = {k: v for k, v in record.items() if isinstance(v, str)}
                assert not any(t in v for v in texts.values() for t in private)
                assert set(texts.pop(FROM_START, "").split(",")) - {""} <= layer4  # tensor names
                assert texts.pop(START_SHA256, None) in (None, digest)  # the starting network's digest
                assert all(set(v.split(",")) <= set(start.group_names) for v in texts.values())
            elif key == LAYOUT:  # the packed records' tensor names, dtypes and shapes, nothing else
                assert set(record) <= {f"{r}.{part}" for r in ("arrays", "scores") for part in ("names", "dtypes", "shapes")}
                assert set(record.get("arrays.names", [])) <= layer4 and not any(
                    t in str(v) for v in record.values() for t in private)
            elif key == "arrays":
                assert set(record) <= {"float32"} and set(unpacked(m)["arrays"]) <= layer4  # never a frozen group's
    up_scores = [m for d, m in seen if d == "up" and "scores" in m.content.keys()]
    assert len(up_scores) == 2  # the final evaluation: one array of probabilities per site, no ids


def test_cross_site_evaluation_sends_each_site_model_to_every_other_site_in_named_messages(sites_manifest, monkeypatch):
    """`sites.cross_site_evaluation`: after the final step each site's personalised model (the
    tensors that differ from the global model: the groups its site_local stage trained) goes up
    in a `query.site_model` reply and down to every other site, and only there, in
    `evaluate.cross_site` messages. The fold's matrix has one row per site model and one
    column per site; its diagonal is the arm's own per-site figure, and each other entry is
    exactly that site model scored here in-process on that site's test patients."""
    from stagewise.study import site_arms
    from stagewise.evaluation.metrics import patient_auroc

    table = pd.read_csv(sites_manifest)
    images, targets = _digits(sites_manifest, n=len(table))
    sites, patients, y = table["hospital"].astype(str).to_numpy(), table["patient"].to_numpy(), table["outcome"].to_numpy()
    tested = table["patient"].isin(table["patient"].unique()[1::2]).to_numpy()
    train, test = np.flatnonzero(~tested), np.flatnonzero(tested)
    personalise = {**PERSONALISE, "unfreeze": {"block3": 0.0}}
    arm = ArmConfig.model_validate({"name": "f", "backbone": "scratch:tinycnn",
                                    "sites": {"mode": "federated", "cross_site_evaluation": True},
                                    "stages": [{"kind": "probe", "rounds": 1, "epochs": 1, "batch_size": 8}, personalise]})
    seen, real = [], site_arms.run_federated
    monkeypatch.setattr(site_arms, "run_federated",
                        lambda *a, **k: real(*a, **k, on_message=lambda d, m: seen.append((d, m))))
    start = _net("scratch:tinycnn")
    fit = site_arms.fit_federated(arm, start, images, targets, sites, train, np.concatenate([train, test]), FP32, 0,
                                  y, patients, test, "mean")
    cross = fit.info["cross_site"]
    matrix = cross["auroc"]
    assert set(matrix) == {"A", "B", "C"} and all(set(row) == {"A", "B", "C"} for row in matrix.values())
    assert cross["site_models_left_sites"] is True

    personalised = set(shared_keys(start, ["block3", "head"], "average"))
    kinds = {m.metadata.message_type for _, m in seen}
    assert kinds == {"train", "evaluate", "query.site_model", "evaluate.cross_site"}
    carrying = [(d, m.metadata.message_type) for d, m in seen if "site_model" in m.content.keys()]
    assert sorted(carrying) == sorted([("up", "query.site_model")] * 3 + [("down", "evaluate.cross_site")] * 6)
    node = {int(m.content["metrics"]["partition"]): m.metadata.src_node_id for d, m in seen if d == "up"}
    models = {k: unpacked(_messages(seen, "up", "query.site_model", node[k])[0])["site_model"].to_torch_state_dict()
              for k in node}
    assert all(set(t) and set(t) <= personalised for t in models.values())  # only what the site_local stage trained
    parts, order = site_arms.site_partitions(images, targets, sites, train, np.concatenate([train, test]))
    from flwr.app import ArrayRecord

    assert cross["site_model_bytes"] == {p.site: ArrayRecord(torch_state_dict=models[k]).count_bytes()
                                         for k, p in enumerate(parts)}
    prob_test = fit.prob[len(train):]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each simulated site scores
    try:
        for b, part in enumerate(parts):
            b_test = np.isin(order[b], test)
            own = prob_test[np.isin(test, order[b][b_test])]
            assert matrix[part.site][part.site] == patient_auroc(own[:, 0], order[b][b_test], y, patients, "mean")
            trainer = SiteTrainer(part, arm, start, FP32, seed=0)
            for down in _messages(seen, "down", "evaluate.cross_site", node[b]):
                a = int(down.content["config"]["model-partition"])
                assert a != b and set(unpacked(down)["site_model"]) == set(models[a])
                here = trainer.cross_scores(unpacked(down)["arrays"].to_torch_state_dict(), models[a])
                assert np.abs(here[b_test] - own).max() > 1e-4  # another model than the site's own
                expected = patient_auroc(here[b_test, 0], order[b][b_test], y, patients, "mean")
                assert matrix[parts[a].site][part.site] == pytest.approx(expected, abs=1e-6)
    finally:
        torch.set_num_threads(threads)
    assert fit.global_prob.shape == (len(test), 1) and set(cross["global_auroc"]) == {"A", "B", "C"}
    assert np.abs(fit.global_prob - prob_test).max() > 1e-4  # the global model, before personalisation
