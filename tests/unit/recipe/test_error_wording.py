"""Recipe errors as a person reads them: a misspelled key gets a did-you-mean (as manifest
columns do), an arm is named by its name, and counts take their singular ("1 repeat")."""

import pytest
from stagewise.recipe import RecipeError, parse_stage, recipe_from_dict
from stagewise.text import counted, did_you_mean


def _recipe(*stages, **top):
    return {"name": "x", "cohort": {"manifest": "a.csv"}, **top,
            "arms": [{"name": "first", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe"}]},
                     {"name": "probe-thaw", "backbone": "scratch:tinycnn", "stages": list(stages)}]}


def _problems(data) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    return str(info.value).splitlines()[1:]


def test_a_misspelled_stage_key_gets_a_did_you_mean_and_its_arm_by_name():
    assert _problems(_recipe({"kind": "probe", "epoch": 3})) == [
        "  - arms.1.stages.0.epoch (arm 'probe-thaw'): unknown field (did you mean 'epochs'?)"]
    # a field only another kind has: its kind's own fields are the guesses
    assert _problems(_recipe({"kind": "thaw", "epochs": 2, "unfreeze": {"layer4": 0.1}, "freeze_fractoin": 0.5})) == [
        "  - arms.1.stages.0.freeze_fractoin (arm 'probe-thaw'): unknown field (misspelled, or not a field of a thaw stage)"]


def test_misspelled_keys_elsewhere_and_stage_kinds_get_one_too():
    problems = _problems({**_recipe({"kind": "prob"}), "protocl": {}, "cohort": {"manifest": "a.csv", "outcom": "y"}})
    assert "  - cohort.outcom: unknown field (did you mean 'outcome'?)" in problems
    assert "  - protocl: unknown field (did you mean 'protocol'?)" in problems
    assert any(p.startswith("  - arms.1.stages.0 (arm 'probe-thaw'): unknown stage kind 'prob' (did you mean 'probe'?)")
               for p in problems)
    with pytest.raises(RecipeError, match=r"unfreze: unknown field \(did you mean 'unfreeze'\?\)"):
        parse_stage({"kind": "thaw", "unfreeze": {"layer4": 0.1}, "unfreze": {}})


def test_an_arms_own_rule_names_the_arm():
    assert _problems(_recipe({"kind": "probe", "rounds": 2})) == [
        "  - arms.1 (arm 'probe-thaw'): stage 0 (probe) has `rounds`, which only a federated arm (sites.mode) uses"]


def test_counts_take_the_singular_of_one():
    assert (counted(1, "repeat"), counted(6, "repeat"), counted(0, "epoch")) == ("1 repeat", "6 repeats", "0 epochs")
    assert did_you_mean("epoch", ["epochs", "lr"]) == " (did you mean 'epochs'?)" and did_you_mean("zzz", ["lr"]) == ""


def test_the_report_and_the_progress_lines_say_1_repeat_and_1_epoch():
    import io

    from stagewise.report.sections import protocol_text
    from stagewise.study.progress import LineReporter

    text = protocol_text({"kind": "group_kfold", "folds": 5, "repeats": 1}, 5, {})
    assert "× 1 repeat = 5 splits" in text
    stream = io.StringIO()
    reporter = LineReporter(stream, epochs=True)
    reporter.plan(["a"], 1)
    reporter.fold_started("a", None, 1)
    assert "1 fold to train (1 model unit x 1 split)" in stream.getvalue()
    assert "a: training, 1 epoch\n" in stream.getvalue()
