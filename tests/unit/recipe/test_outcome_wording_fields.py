"""cohort.outcome_label / outcome_horizon: the outcome in clinical words and its time frame.
Optional one-line strings, kept when a recipe leaves the site."""

import pytest

from stagewise.recipe import RecipeError, outcome_phrase, recipe_from_dict, recipe_to_dict, shareable_recipe

ARMS = [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1}]}]


def _recipe(**cohort):
    return recipe_from_dict({"name": "t", "cohort": {"manifest": "/site/private/cohort.csv", "outcome": "went_icu", **cohort},
                             "arms": ARMS})


def test_unset_by_default_and_then_the_column_names_the_outcome():
    r = _recipe()
    assert r.cohort.outcome_label is None and r.cohort.outcome_horizon is None
    assert outcome_phrase(r.cohort.outcome, r.cohort.outcome_label, r.cohort.outcome_horizon) == "went_icu"
    assert r.cohort.wording("went_icu") == {"outcome_label": None, "outcome_horizon": None}


def test_set_they_word_the_primary_outcome_only():
    r = _recipe(outcome_label="admission to intensive care", outcome_horizon="within 30 days of the radiograph",
                extra_outcomes=["died"])
    assert outcome_phrase("went_icu", r.cohort.outcome_label, r.cohort.outcome_horizon) == \
        "admission to intensive care within 30 days of the radiograph"
    assert outcome_phrase("went_icu", r.cohort.outcome_label, None, name_column=True) == \
        "admission to intensive care (column went_icu)"
    assert r.cohort.wording("went_icu")["outcome_label"] == "admission to intensive care"
    assert r.cohort.wording("died") == {"outcome_label": None, "outcome_horizon": None}


@pytest.mark.parametrize("field", ["outcome_label", "outcome_horizon"])
@pytest.mark.parametrize("value, words", [("", "empty"), ("   ", "empty"), ("ICU\nadmission", "one line"),
                                          ("ICU\r\nadmission", "one line"), ("ICU\tadmission", "control")])
def test_empty_or_multi_line_wording_is_refused_naming_the_field(field, value, words):
    with pytest.raises(RecipeError) as err:
        _recipe(**{field: value})
    assert f"cohort.{field}" in str(err.value) and words in str(err.value)


def test_surrounding_spaces_are_dropped():
    assert _recipe(outcome_label="  admission to intensive care ").cohort.outcome_label == "admission to intensive care"


def test_a_shared_recipe_keeps_the_wording_and_drops_the_path():
    r = _recipe(outcome_label="admission to intensive care", outcome_horizon="within 30 days of the radiograph")
    shared = shareable_recipe(recipe_to_dict(r))
    assert shared["cohort"]["outcome_label"] == "admission to intensive care"
    assert shared["cohort"]["outcome_horizon"] == "within 30 days of the radiograph"
    assert "/site/private" not in str(shared)
    again = recipe_from_dict(shared)  # and it reads back
    assert again.cohort.outcome_horizon == "within 30 days of the radiograph"
