"""`stagewise evaluate --subgroup`: a column, or a numeric column with its cut points; a bad
one is reported with the other option problems, before any image is read."""

from stagewise.external import ExternalOptions
from stagewise.external.manifest import cohort_config


def test_subgroup_options_parse_and_bad_ones_are_named():
    options = ExternalOptions(subgroups=["view", "age:40,65"])
    assert [(s.column, s.bands) for s in options.subgroup_configs()] == [("view", None), ("age", [40.0, 65.0])]
    problems = ExternalOptions(subgroups=["age:65,40", ":3", "age:x"]).problems(["probe"])
    assert len(problems) == 3 and all(p.startswith("--subgroup ") and "age:40,65" in p for p in problems)


def test_without_the_option_the_bundle_recipes_subgroups_and_baselines_apply_where_the_manifest_has_them(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,outcome,patient,sex,grade\n")
    recipe = {"cohort": {"subgroups": [{"column": "sex", "bands": None}, {"column": "age", "bands": [40.0]}],
                         "baselines": ["grade", "irds"]}}
    cfg = cohort_config(manifest, ExternalOptions(), recipe, "outcome")
    assert [s.column for s in cfg.subgroups] == ["sex"] and cfg.baselines == ["grade"]
    cfg = cohort_config(manifest, ExternalOptions(subgroups=["grade:1"]), recipe, "outcome")
    assert [(s.column, s.bands) for s in cfg.subgroups] == [("grade", [1.0])]
