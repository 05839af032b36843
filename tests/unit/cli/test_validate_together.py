"""`validate` reports a recipe's errors and its cohort's problems together: a stage's `lr: 0`
used to hide a truncated image until the recipe was fixed."""

import pandas as pd
import yaml
from typer.testing import CliRunner

from stagewise.cli import app


def test_recipe_errors_and_cohort_problems_are_reported_together(digits_manifest, tmp_path):
    table = pd.read_csv(digits_manifest)
    table["path"] = [str(digits_manifest.parent / p) for p in table["path"]]
    broken = tmp_path / "truncated.png"
    broken.write_bytes(open(table["path"][0], "rb").read()[:60])
    table.loc[0, "path"] = str(broken)
    table.to_csv(tmp_path / "cohort.csv", index=False)
    recipe = {"name": "t", "cohort": {"manifest": "cohort.csv"}, "data": {"image_size": 32},
              "arms": [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1, "lr": 0}]}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml")])
    said = " ".join(result.output.split())
    assert result.exit_code == 2, said
    assert "lr" in said and "greater than 0" in said  # the recipe's error
    assert "truncated.png" in said and "row 2" in said  # and the cohort's, at once
    assert "Traceback" not in said


def test_a_valid_recipe_still_reports_only_the_cohort(digits_manifest, tmp_path):
    recipe = {"name": "t", "cohort": {"manifest": str(digits_manifest)}, "data": {"image_size": 32},
              "arms": [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1, "lr": 0}]}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "checked on its own" not in result.output  # a sound cohort: nothing added
