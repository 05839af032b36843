"""`protocol.threshold`: the short forms keep their meaning (and their written form, so that
recipes and run fingerprints made before the mapping existed read and hash as before), the
mapping names a rule and the scores it is chosen on, and a bad value is refused naming the field."""

import pytest
import yaml
from typer.testing import CliRunner

from stagewise.cli import app
from stagewise.recipe import RecipeError, ThresholdRule, recipe_from_dict


def _recipe(threshold):
    return recipe_from_dict({"name": "r", "cohort": {"manifest": "m.csv"}, "protocol": {"threshold": threshold},
                             "arms": [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe"}]}]})


@pytest.mark.parametrize("written, rule, on, value", [
    ("youden", "youden", "training", None),
    ("prevalence", "prevalence", "training", None),
    (0.5, "fixed", "training", 0.5),
    ({"fixed": 0.3}, "fixed", "training", 0.3),
    ({"rule": "youden", "on": "inner_cv", "folds": 4}, "youden", "inner_cv", None),
    ({"rule": "sensitivity", "value": 0.9, "on": "inner_cv"}, "sensitivity", "inner_cv", 0.9),
    ({"rule": "net_benefit", "value": 0.2}, "net_benefit", "training", 0.2),
])
def test_short_forms_and_mappings(written, rule, on, value):
    t = _recipe(written).protocol.threshold
    assert (t.rule, t.on, t.value) == (rule, on, value)
    assert ThresholdRule.model_validate(t.model_dump(mode="json")) == t  # what metrics.json holds reads back


def test_short_forms_are_written_as_before():
    assert _recipe("youden").protocol.model_dump(mode="json")["threshold"] == "youden"
    assert _recipe(0.5).protocol.model_dump(mode="json")["threshold"] == 0.5
    assert _recipe({"rule": "youden", "on": "inner_cv"}).protocol.model_dump(mode="json")["threshold"] == {
        "rule": "youden", "value": None, "on": "inner_cv", "folds": 3}


@pytest.mark.parametrize("written, message", [
    ("median", "no threshold rule"),
    ({"rule": "sensitivity"}, "needs a value"),
    ({"rule": "youden", "value": 0.2}, "takes no value"),
    ({"rule": "specificity", "value": 1.5}, "strictly between 0 and 1"),
    (1.5, "strictly between 0 and 1"),
    ({"rule": "youden", "on": "test"}, "on"),
    ({"rule": "youden", "on": "inner_cv", "folds": 1}, "folds"),
    ({"fixed": 0.5, "on": "inner_cv"}, "stands alone"),
])
def test_bad_values_are_refused_naming_the_field(written, message):
    with pytest.raises(RecipeError, match="protocol.threshold") as err:
        _recipe(written)
    assert message in str(err.value)


def test_validate_names_the_field(tmp_path, digits_manifest):
    recipe = {"name": "t", "cohort": {"manifest": str(digits_manifest)}, "data": {"image_size": 32},
              "protocol": {"threshold": {"rule": "sensitivity", "on": "inner_cv"}},
              "arms": [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1}]}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml")])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "protocol.threshold" in said and "needs a value" in said, said
