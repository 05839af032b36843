"""Recipes: every example loads; bad recipes fail with the field named."""

from pathlib import Path

import pytest

from stagewise.recipe import RecipeError, load_recipe, recipe_from_dict

EXAMPLES = sorted((Path(__file__).parents[3] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.cohort.manifest.is_absolute()


def _base(**arm):
    return {"name": "r", "cohort": {"manifest": "m.csv"},
            "arms": [{"name": "a", "backbone": "scratch:resnet18", "stages": [{"kind": "probe"}], **arm}]}


def test_overrides_change_fields_before_validation(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ncohort: {manifest: m.csv}\narms:\n  - {name: a, backbone: scratch:resnet18, stages: [{kind: probe}]}\n")
    recipe = load_recipe(path, ["protocol.repeats=3", "arms.0.stages.0.epochs=4", "data.image_size=64"])
    assert (recipe.protocol.repeats, recipe.arms[0].stages[0].epochs, recipe.data.image_size) == (3, 4, 64)
    with pytest.raises(RecipeError, match="protocol.repeats"):
        load_recipe(path, ["protocol.repeats=0"])


@pytest.mark.parametrize("arm, message", [
    ({"stages": [{"kind": "thaw"}]}, "unfreeze"),
    ({"stages": [{"kind": "probe", "lr": {"layer4": 1e-3}}]}, "head"),
    ({"stages": [{"kind": "probe"}, {"kind": "pretrain", "source": {"manifest": "s.csv", "targets": ["y"]}}]}, "come first"),
    ({"stages": [{"kind": "ssl"}]}, "source"),
    ({"name": "a/b"}, "name"),
    ({"tune": {"grid": {"stages.5.lr": [1e-3]}}}, "does not name a field"),
])
def test_bad_arms_name_the_problem(arm, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(_base(**arm))


@pytest.mark.parametrize("stage, field", [
    ({"kind": "thaw", "unfreeze": {"layer4": 0.1}, "unfrezee": {"layer3": 0.3}}, "unfrezee"),
    ({"kind": "probe", "unfreeze": {"layer4": 0.1}}, "unfreeze"),      # only thaw stages unfreeze
    ({"kind": "finetune", "freeze_fraction": 0.5}, "freeze_fraction"),  # only dynamic stages
    ({"kind": "probe", "method": "simclr"}, "method"),                   # only ssl stages
    ({"kind": "thaw", "unfreeze": {"layer4": 1.5}}, "unfreeze"),
    ({"kind": "dual"}, "augment"),
    ({"kind": "bogus"}, "kind"),
])
def test_stage_kinds_take_only_their_own_fields(stage, field):
    with pytest.raises(RecipeError, match=field):
        recipe_from_dict(_base(stages=[stage]))


def test_each_stage_kind_is_its_own_class_with_its_groups():
    from stagewise.recipe import ProbeStage, ThawStage, parse_stage

    groups = ["stem", "layer1", "layer2", "head"]
    thaw = parse_stage({"kind": "thaw", "epochs": 20, "unfreeze": {"layer2": 0.1, "layer1": 0.6}})
    assert isinstance(thaw, ThawStage) and thaw.members(groups) == ["layer1", "layer2", "head"]
    assert thaw.start_epochs() == {"layer2": 2, "layer1": 12}
    assert ProbeStage().members(groups) == ["head"]
    assert parse_stage({"kind": "finetune"}).members(groups) == groups


@pytest.mark.parametrize("lr", [0, -1e-3, {"head": 1e-3, "layer4": 0}])
def test_learning_rates_must_be_positive(lr):
    with pytest.raises(RecipeError, match="lr"):
        recipe_from_dict(_base(stages=[{"kind": "probe", "lr": lr}]))


def test_groups_kept_at_the_sites_need_a_federated_arm_and_group_kfold(tmp_path):
    """`sites.local_groups` (FedPer/FedRep) is federated only, has no global version for a
    held-out site, and `validate` names a group the backbone has not."""
    from stagewise.study.preflight import arm_problems

    fed = {"name": "f", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "rounds": 1}],
           "sites": {"mode": "federated", "local_groups": ["head"]}}
    base = {"name": "r", "cohort": {"manifest": "m.csv", "site": "hospital"}}
    recipe = recipe_from_dict(base | {"arms": [fed]})
    assert recipe.arms[0].sites.local_groups == ["head"] and arm_problems(recipe.arms[0]) == []
    with pytest.raises(RecipeError, match=r"arms.0.sites \(arm 'f'\): local_groups: only a federated arm"):
        recipe_from_dict(base | {"arms": [{**fed, "sites": {"mode": "local", "local_groups": ["head"]}, "stages": [{"kind": "probe"}]}]})
    with pytest.raises(RecipeError, match="sites.local_groups.*held-out site has no model"):
        recipe_from_dict(base | {"arms": [fed], "protocol": {"kind": "leave_one_site_out"}})
    wrong = recipe_from_dict(base | {"arms": [{**fed, "sites": {"mode": "federated", "local_groups": ["layer9"]}}]})
    (problem,) = arm_problems(wrong.arms[0])
    assert "sites.local_groups names ['layer9']" in problem and "head" in problem


def test_a_schedule_across_rounds_is_federated_only_and_said_in_the_strategy_text():
    from stagewise.recipe.arms import strategy_text

    fed = {"name": "f", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "rounds": 2}],
           "sites": {"mode": "federated", "lr_schedule": "across_rounds"}}
    base = {"name": "r", "cohort": {"manifest": "m.csv", "site": "hospital"}}
    recipe = recipe_from_dict(base | {"arms": [fed]})
    assert "each stage's LR schedule spans its rounds" in strategy_text(recipe.arms[0].sites.model_dump())
    assert "spans its rounds" not in strategy_text({"strategy": "fedavg"})
    with pytest.raises(RecipeError, match=r"arms.0.sites \(arm 'f'\): lr_schedule: only a federated arm"):
        recipe_from_dict(base | {"arms": [{**fed, "sites": {"mode": "local", "lr_schedule": "across_rounds"},
                                           "stages": [{"kind": "probe"}]}]})
    with pytest.raises(RecipeError, match="lr_schedule"):
        recipe_from_dict(base | {"arms": [{**fed, "sites": {"mode": "federated", "lr_schedule": "per_epoch"}}]})


def test_a_personalisation_stage_follows_the_federated_stages_of_a_federated_arm():
    fed = {"name": "f", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
           "stages": [{"kind": "probe", "rounds": 2}, {"kind": "finetune", "site_local": True, "epochs": 1}]}
    base = {"name": "r", "cohort": {"manifest": "m.csv", "site": "hospital"}}
    arm = recipe_from_dict(base | {"arms": [fed]}).arms[0]
    assert arm.stages[1].site_local and arm.stages[1].rounds is None
    for stages, says in [
        ([fed["stages"][1], fed["stages"][0]], "comes after the federated stages"),
        ([fed["stages"][1]], "comes after the federated stages"),
        ([fed["stages"][0], {**fed["stages"][1], "rounds": 1}], "remove `rounds`"),
    ]:
        with pytest.raises(RecipeError, match=says):
            recipe_from_dict(base | {"arms": [{**fed, "stages": stages}]})
    with pytest.raises(RecipeError, match="site_local .* is for federated arms"):
        recipe_from_dict(base | {"arms": [{**fed, "sites": {"mode": "local"},
                                           "stages": [{"kind": "probe"}, fed["stages"][1]]}]})


def test_cross_site_evaluation_needs_site_models_and_group_kfold():
    """`sites.cross_site_evaluation` is refused, naming it, where there is no site model to send
    (every site ends with the global model; a local arm) and under leave-one-site-out (only the
    held-out site has test patients, and the global model scores them)."""
    personalise = {"kind": "probe", "site_local": True, "epochs": 1}
    fed = {"name": "f", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "rounds": 1}, personalise],
           "sites": {"mode": "federated", "cross_site_evaluation": True}}
    base = {"name": "r", "cohort": {"manifest": "m.csv", "site": "hospital"}}
    assert recipe_from_dict(base | {"arms": [fed]}).arms[0].sites.cross_site_evaluation
    kept = {**fed, "stages": [{"kind": "probe", "rounds": 1}],
            "sites": {"mode": "federated", "local_groups": ["head"], "cross_site_evaluation": True}}
    assert recipe_from_dict(base | {"arms": [kept]}).arms[0].sites.local_groups == ["head"]
    assert not recipe_from_dict(base | {"arms": [{**fed, "sites": {"mode": "federated"}}]}).arms[0].sites.cross_site_evaluation
    with pytest.raises(RecipeError, match=r"sites.cross_site_evaluation: every site of this arm ends with the global"):
        recipe_from_dict(base | {"arms": [{**fed, "stages": [{"kind": "probe", "rounds": 1}]}]})
    with pytest.raises(RecipeError, match=r"sites.cross_site_evaluation is for a federated arm"):
        recipe_from_dict(base | {"arms": [{**fed, "stages": [{"kind": "probe"}],
                                           "sites": {"mode": "local", "cross_site_evaluation": True}}]})
    with pytest.raises(RecipeError, match=r"sites.cross_site_evaluation.*leave_one_site_out.*global model scores it"):
        recipe_from_dict(base | {"arms": [fed], "protocol": {"kind": "leave_one_site_out"}})


def test_a_deployed_job_refuses_cross_site_evaluation_naming_the_field():
    from stagewise.federated.job import job_problems

    fed = {"name": "f", "backbone": "scratch:tinycnn",
           "stages": [{"kind": "probe", "rounds": 1}, {"kind": "probe", "site_local": True, "epochs": 1}],
           "sites": {"mode": "federated", "cross_site_evaluation": True}}
    recipe = recipe_from_dict({"name": "r", "cohort": {"manifest": "m.csv"}, "arms": [fed]})
    (problem,) = job_problems(recipe, recipe.arms[0])
    assert "sites.cross_site_evaluation" in problem and "does not run yet" in problem
