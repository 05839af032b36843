"""docs/recipe-reference.md is the schema's own account of every recipe field: it must be what
`stagewise.recipe.reference` writes from the models now, and every field must have a meaning."""

from pathlib import Path

import pytest
from pydantic import Field
from stagewise.recipe import Recipe
from stagewise.recipe.base import StrictModel
from stagewise.recipe.reference import COMMAND, recipe_reference, type_text, undocumented_fields

REFERENCE = Path(__file__).resolve().parents[3] / "docs" / "recipe-reference.md"


def test_the_reference_file_is_what_the_schema_gives_now():
    assert REFERENCE.read_text() == recipe_reference(), (
        f"docs/recipe-reference.md differs from the recipe models: regenerate it with `{COMMAND}` "
        "(run in the repository root) and commit the result")


def test_every_recipe_field_has_a_one_line_meaning():
    assert undocumented_fields() == [], "give each field a docstring (its meaning) under its definition"


def test_a_row_gives_path_type_bounds_default_and_the_docstring():
    text = recipe_reference()
    assert ("| `protocol.folds` | integer ≥ 2 | `5` | Folds per repeat (test parts of the cohort); each patient "
            "is tested once per repeat. |") in text
    assert "| `protocol.threshold` | section [`protocol.threshold`](#protocol-threshold) | its fields' defaults |" in text
    assert ("| `protocol.threshold.rule` | one of `youden`, `sensitivity`, `specificity`, `net_benefit`, `prevalence`, "
            "`fixed` | `youden` |") in text
    assert "| `arms[].stages[].kind` | one of `probe`, `thaw`, `finetune`, `dynamic`, `dual`, `pretrain`, `ssl` |" in text
    # a kind that redefines a shared field shows its own version under its own heading
    probe = text.split("## `arms[].stages[]`, kind `probe`")[1].split("## ")[0]
    assert "| `arms[].stages[].epochs` | integer ≥ 0 | `10` |" in probe
    # a model used twice (CutMix and MixUp) is one section, linked from both fields
    assert text.count("## `arms[].stages[].cutmix`") == 1 and "## `arms[].stages[].mixup`" not in text
    assert "| `arms[].stages[].mixup` | section [`arms[].stages[].cutmix`](#arms-stages-cutmix) |" in text


def test_a_field_added_without_a_docstring_is_named(monkeypatch):
    class Extra(StrictModel):
        level: int = Field(1, ge=0)

    fields = dict(Recipe.model_fields)
    fields["extra"] = Recipe.model_fields["data"].__class__(annotation=Extra, default=Extra())
    monkeypatch.setattr(Recipe, "__pydantic_fields__", fields)
    assert undocumented_fields() == ["extra", "extra.level"]
    with pytest.raises(ValueError, match="extra, extra.level"):
        recipe_reference()


def test_type_text_reads_as_yaml():
    assert type_text(list[float], [], None) == "list of number"
    assert type_text(dict[str, float], [], None) == "map of text to number"
    assert type_text(bool | None, [], None) == "true/false"
