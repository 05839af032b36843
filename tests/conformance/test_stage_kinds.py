"""Every registered stage kind, as scikit-learn's `check_estimator` runs over every estimator:
it is known to the recipe, plans against a network's groups, trains one tiny fold, resumes
from a finished run, refuses what it cannot do with a message naming the field, and says
whether it can run federated (and, where it can, trains one federated round at a site)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import small_recipe
from stagewise.models import create_backbone
from stagewise.recipe import RecipeError, parse_stage, recipe_from_dict
from stagewise.recipe.stages import STAGE_KINDS
from stagewise.training.stages import list_stage_kinds, stage_kind

KINDS = list_stage_kinds()
TINY = "scratch:tinycnn"


@pytest.fixture(scope="session")
def source_manifest(digits_manifest, tmp_path_factory):
    """A source task for kinds that run before cross-validation: the cohort's own images with
    a regression target (their mean ink), under another manifest."""
    table = pd.read_csv(digits_manifest)
    table["path"] = [str(digits_manifest.parent / p) for p in table["path"]]
    table["age"] = np.arange(len(table)) % 7
    path = tmp_path_factory.mktemp("source") / "source.csv"
    table[["path", "age"]].to_csv(path, index=False)
    return path


def tiny(kind: str, source) -> dict:
    """The kind's own example, shrunk to one epoch, its source manifest made real."""
    stage = copy.deepcopy(stage_kind(kind).example) | {"epochs": 1, "batch_size": 16}
    if isinstance(stage.get("source"), dict):
        stage["source"]["manifest"] = str(source)
    if kind == "thaw":
        stage["unfreeze"] = {"block3": 0.0}
    return stage


def backbone_for(kind: str, source) -> str:
    check = stage_kind(kind).backbone_problems
    stage = parse_stage(tiny(kind, source))
    return "dual:" + TINY if check and check(stage, create_backbone(TINY), TINY) else TINY


def arm_for(kind: str, source) -> dict:
    stages = [tiny(kind, source)]
    if "fold" not in stage_kind(kind).runs_on:  # runs before cross-validation only: add a stage on the cohort
        stages.append({"kind": "probe", "epochs": 1, "batch_size": 16})
    return {"name": kind, "backbone": backbone_for(kind, source), "stages": stages}


def test_the_registry_and_the_recipe_know_the_same_kinds():
    assert sorted(KINDS) == sorted(STAGE_KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_a_kind_answers_every_question_about_itself(kind, source_manifest):
    k = stage_kind(kind)
    assert k.schema.model_fields["kind"].default == kind and k.summary
    assert isinstance(k.federated, bool) and set(k.runs_on) <= {"fold", "source"} and k.runs_on
    stage = parse_stage(tiny(kind, source_manifest))
    assert stage_kind(stage) is k
    assert ("source" in k.runs_on) == hasattr(stage, "source")


@pytest.mark.parametrize("kind", KINDS)
def test_a_kind_plans_against_the_network_groups(kind, source_manifest):
    from stagewise.training.engine import plan_stage

    stage = parse_stage(tiny(kind, source_manifest))
    backbone = create_backbone(backbone_for(kind, source_manifest))
    plan = plan_stage(stage, backbone.group_names + ["head"])
    assert plan is not None


@pytest.mark.parametrize("kind", KINDS)
def test_a_misspelled_setting_is_refused_naming_it(kind, source_manifest):
    stage = tiny(kind, source_manifest)
    stage["epoch"] = stage.pop("epochs")
    with pytest.raises(RecipeError, match="epoch"):
        parse_stage(stage)


@pytest.mark.parametrize("kind", KINDS)
def test_a_kind_runs_federated_exactly_when_it_says_so(kind, source_manifest, digits_manifest):
    stage = tiny(kind, source_manifest)
    external = isinstance(stage.get("source"), dict)
    if not external:
        stage["rounds"] = 1
    arm = {"name": "f", "backbone": backbone_for(kind, source_manifest), "sites": {"mode": "federated"},
           "stages": [stage] + ([{"kind": "probe", "epochs": 1, "batch_size": 16, "rounds": 1}] if external else [])}
    data = {"name": "t", "cohort": {"manifest": str(digits_manifest), "site": "patient"}, "arms": [arm]}
    if stage_kind(kind).federated or external:  # a source stage runs centrally, before the sites train
        recipe_from_dict(data)
    else:
        with pytest.raises(RecipeError, match=rf"stage 0|{kind}"):
            recipe_from_dict(data)


@pytest.mark.parametrize("kind", [k for k in KINDS if stage_kind(k).federated])
def test_a_federated_kind_trains_one_round_at_a_site_and_sends_only_what_trains(kind, source_manifest):
    from stagewise.federated.sharing import shared_keys
    from stagewise.federated.site import SitePartition, SiteTrainer
    from stagewise.models import Network
    from stagewise.recipe import ArmConfig
    from stagewise.training.cache import ImageSet
    from stagewise.training.compute import resolve_compute
    from stagewise.federated.rounds import round_plan

    stage = tiny(kind, source_manifest) | {"rounds": 1}
    arm = ArmConfig.model_validate({"name": "f", "backbone": TINY, "sites": {"mode": "federated"}, "stages": [stage]})
    torch.manual_seed(0)
    start = Network.build(create_backbone(TINY), 1, 0, 0.0, None)
    images = ImageSet(torch.rand(24, 1, 32, 32).half(), "conformance")
    targets = (torch.arange(24) % 2).float().unsqueeze(1)
    partition = SitePartition("A", images, targets, np.arange(16), np.arange(16, 24))
    trainer = SiteTrainer(partition, arm, start, resolve_compute(recipe_from_dict(
        {"name": "t", "cohort": {"manifest": "m.csv"}, "compute": {"device": "cpu", "precision": "fp32"},
         "arms": [{"name": "a", "backbone": TINY, "stages": [{"kind": "probe"}]}]}).compute), seed=0)
    ((_, _, trainable),) = round_plan(arm, start.backbone.group_names + ["head"])
    keys = shared_keys(start, trainable, arm.sites.bn_stats)
    received = {k: v.clone() for k, v in start.state_dict().items() if k in keys}
    sent, state, n, loss, _ = trainer.train_round(received, None, 0, 0, trainable)
    assert set(sent) == set(keys) and n == 16 and np.isfinite(loss)
    assert any(not torch.equal(sent[k], received[k]) for k in sent)  # it trained
    frozen = [k for k in start.state_dict() if k not in keys and "running" not in k and "num_batches" not in k]
    assert all(torch.equal(state[k], start.state_dict()[k]) for k in frozen)  # what does not travel did not train


def test_every_kind_trains_a_fold_and_resumes_from_the_finished_run(digits_manifest, source_manifest, tmp_path):
    from stagewise.study import SilentReporter, run_study

    class Count(SilentReporter):
        def __init__(self):
            self.resumed, self.trained = 0, 0

        def fold_done(self, arm, split, metrics, resumed):
            self.resumed += resumed
            self.trained += not resumed

    recipe = small_recipe(digits_manifest, [arm_for(k, source_manifest) for k in KINDS], protocol={"folds": 2},
                          evaluation={"saliency": 0, "bootstrap": 0, "report": False})
    first, again = Count(), Count()
    done = run_study(recipe, tmp_path / "run", first)
    assert first.trained == 2 * len(KINDS) and first.resumed == 0
    assert set(done.metrics["arms"]) == set(KINDS)
    for kind in KINDS:
        record = json.loads((tmp_path / "run" / "folds" / kind / "r0-f0.json").read_text())
        stages = [s["kind"] for s in record["stages"]]
        assert stages[0] == kind or "fold" not in stage_kind(kind).runs_on
    resumed = run_study(recipe, tmp_path / "run", again)
    assert again.trained == 0 and again.resumed == 2 * len(KINDS)
    pd.testing.assert_frame_equal(done.predictions, resumed.predictions)
