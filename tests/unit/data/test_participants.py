"""The participant flow, the subgroup levels and the characteristics table of a cohort
(recipe `cohort.subgroups`), read by the manifest loader; and the recipe field itself, which
changes no fold fingerprint (the report breaks finished out-of-fold scores down by it)."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stagewise.data import CohortError, load_cohort
from stagewise.data.subgroups import band_labels, band_of
from stagewise.recipe import CohortConfig, RecipeError, recipe_from_dict, recipe_to_dict
from stagewise.study.rundir import recipe_differences, unit_fingerprint


def _cohort(tmp_path, rows: list[dict], **cfg) -> CohortConfig:
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir(exist_ok=True)
    for i, r in enumerate(rows):
        r.setdefault("path", f"img/{i}.png")
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / r["path"])
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    return CohortConfig(manifest=tmp_path / "m.csv", **cfg)


def _rows(n: int = 12) -> list[dict]:
    """n patients, two images each (an AP and a PA film), alternating outcomes, two sites."""
    out = []
    for p in range(n):
        for view in ("AP", "PA"):
            out.append({"patient": f"p{p}", "outcome": p % 2, "site": "north" if p < n // 2 else "south",
                        "sex": "F" if p % 3 else "M", "age": 30 + 5 * p, "view": view})
    return out


def test_flow_counts_add_up_on_a_manifest_with_planted_empty_outcomes(tmp_path):
    rows = _rows()
    for i in (1, 4, 7):  # three rows without an outcome, dropped as the recipe allows
        rows[i]["outcome"] = ""
    cohort = load_cohort(_cohort(tmp_path, rows, drop_missing_outcome=True))
    flow = cohort.summary()["flow"]
    assert flow == {"rows_read": 24, "dropped_missing_outcome": 3, "images": 21, "patients": 12}
    assert flow["rows_read"] == flow["dropped_missing_outcome"] + flow["images"]


def test_subgroup_levels_bands_and_characteristics_by_outcome_and_site(tmp_path):
    cfg = _cohort(tmp_path, _rows(), site="site", subgroups=["sex", "view", {"column": "age", "bands": [40, 65]}])
    cohort = load_cohort(cfg)
    assert list(cohort.groups.columns) == ["row", "sex", "view", "age"]
    assert set(cohort.groups["age"]) == {"< 40", "40 to < 65", "≥ 65"}
    assert list(cohort.table.columns) == ["row", "path", "y", "patient", "site"]  # levels stay out of the table
    ch = cohort.summary()["characteristics"]
    assert ch["subgroups"]["view"] == {"levels": ["AP", "PA"], "per_image": True, "bands": None}
    assert ch["subgroups"]["sex"]["per_image"] is False
    assert ch["subgroups"]["age"]["levels"] == ["< 40", "40 to < 65", "≥ 65"]
    groups = {(g["by"], g["level"]): g for g in ch["groups"]}
    assert set(groups) == {("all", "all"), ("outcome", "positive"), ("outcome", "negative"),
                           ("site", "north"), ("site", "south")}
    assert groups["all", "all"]["patients"] == 12 and groups["outcome", "positive"]["patients"] == 6
    assert groups["outcome", "positive"]["prevalence_patients"] == 1.0
    assert groups["site", "north"]["patients"] + groups["site", "south"]["patients"] == 12
    # every patient has an AP and a PA image: both levels count all 12 patients, 12 images each
    assert groups["all", "all"]["levels"]["view"] == {"AP": {"patients": 12, "images": 12},
                                                      "PA": {"patients": 12, "images": 12}}
    sex = groups["outcome", "negative"]["levels"]["sex"]  # negatives: patients 0, 2, 4, 6, 8, 10
    assert sex["M"]["patients"] == 2 and sex["F"]["patients"] == 4  # p0, p6 are M (p % 3 == 0)


def test_a_missing_subgroup_column_is_named_with_the_manifest_and_a_guess(tmp_path):
    with pytest.raises(CohortError) as err:
        load_cohort(_cohort(tmp_path, _rows(), subgroups=["sexe"]))
    text = str(err.value)
    assert "column 'sexe' (cohort.subgroups) is not in the manifest (did you mean 'sex'?)" in text
    assert "m.csv" in text


def test_bad_subgroup_values_are_problems_naming_the_row(tmp_path):
    rows = _rows()
    rows[3]["age"] = "forty"
    for i, r in enumerate(rows):
        r["code"] = f"c{i}"  # 24 distinct values
    with pytest.raises(CohortError) as err:
        load_cohort(_cohort(tmp_path, rows, subgroups=[{"column": "age", "bands": [40]}, "code", "patient"]))
    text = str(err.value)
    assert "row 5: img/3.png: column 'age' (cohort.subgroups, cut into bands): 'forty' is not a number" in text
    assert "column 'code' (cohort.subgroups) has 24 distinct values" in text and "bands" in text
    assert "column 'patient' (cohort.subgroups) is the cohort.patient column" in text


def test_a_patient_at_two_sites_is_refused_for_a_study_but_not_when_sites_group_images(tmp_path):
    rows = _rows()
    for r in rows:
        r["projection"] = r["view"]
    cfg = _cohort(tmp_path, rows, site="projection")
    with pytest.raises(CohortError, match="appears at several sites") as err:
        load_cohort(cfg)
    assert "if column 'projection' rather groups one patient's images (a view, a scanner), name it in the " \
           "cohort's `subgroups:` instead of `site:`" in str(err.value)
    cohort = load_cohort(cfg, sites_hold_patients=False)
    assert cohort.n_patients == 12 and set(cohort.table["site"]) == {"AP", "PA"}


def test_band_labels_read_as_intervals():
    assert band_labels([0, 40, 65]) == ["< 0", "0 to < 40", "40 to < 65", "≥ 65"]
    assert [band_of(v, [40, 65]) for v in (39.9, 40, 64, 65, 90)] == ["< 40", "40 to < 65", "40 to < 65", "≥ 65", "≥ 65"]


RECIPE = {"name": "t", "seed": 0, "cohort": {"manifest": "cohort.csv", "outcome": "went_icu"}, "data": {"image_size": 32},
          "protocol": {"folds": 2}, "compute": {"device": "cpu", "precision": "fp32", "channels_last": False},
          "arms": [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1}]}]}
BEFORE = {"model": "d7d7b103de79677c", "baseline": "769b4e98f7ab4218"}  # as test_outcome_wording_fingerprint pins


def _recipe(**cohort):
    d = json.loads(json.dumps(RECIPE))
    d["cohort"].update(cohort)
    return recipe_from_dict(d)


def test_subgroups_enter_no_fingerprint_and_no_refusal():
    r = _recipe(subgroups=["sex", {"column": "age", "bands": [40, 65]}])
    assert [s.model_dump() for s in r.cohort.subgroups] == [{"column": "sex", "bands": None},
                                                           {"column": "age", "bands": [40.0, 65.0]}]
    got = {"model": unit_fingerprint(r, "model", r.arms[0], 1.0, None, "digest"),
           "baseline": unit_fingerprint(r, "baseline", None, 1.0, "x", "digest")}
    assert got == BEFORE
    old = recipe_to_dict(_recipe())
    del old["cohort"]["subgroups"]  # a run directory of an earlier stagewise
    assert recipe_differences(old, recipe_to_dict(r), ("cohort.",)) == ([], False)


@pytest.mark.parametrize("subgroups, message", [
    ([{"column": "age", "bands": [65, 40]}], "ascending"),
    ([{"column": "age", "bands": []}], "ascending"),
    (["sex", "sex"], "more than once"),
    ([{"column": "age", "cuts": [40]}], "unknown field"),
])
def test_bad_subgroup_settings_are_refused_naming_the_field(subgroups, message):
    with pytest.raises(RecipeError) as err:
        _recipe(subgroups=subgroups)
    assert "cohort.subgroups" in str(err.value) and message in str(err.value)


def test_a_prepare_scripts_counts_beside_the_manifest_join_the_flow(tmp_path):
    from stagewise.report.participants import flow_rows

    cfg = _cohort(tmp_path, _rows())
    steps = [{"step": "source rows", "rows": 40}, {"step": "left out: lateral view", "rows": 16}]
    (tmp_path / "m.prepare.json").write_text(json.dumps({"steps": steps}))
    summary = load_cohort(cfg).summary()
    assert summary["flow"]["before_manifest"] == steps
    rows = [(r["step"], r["count"]) for r in flow_rows(summary)]
    assert rows[:4] == [("before the manifest, as its prepare script counted:", ""), ("source rows", 40),
                        ("left out: lateral view", 16), ("manifest rows read", 24)]
    (tmp_path / "m.prepare.json").write_text('{"steps": [{"step": "x"}]}')  # unreadable: left out, not guessed
    assert "before_manifest" not in load_cohort(cfg).summary()["flow"]
