"""The outcome's wording (cohort.outcome_label / outcome_horizon) decides no number: it enters
no fold fingerprint, so setting, changing or removing it never refuses or recomputes a run."""

import json

from stagewise.recipe import recipe_from_dict, recipe_to_dict
from stagewise.study.rundir import recipe_differences, unit_fingerprint

RECIPE = {"name": "t", "seed": 0, "cohort": {"manifest": "cohort.csv", "outcome": "went_icu"}, "data": {"image_size": 32},
          "protocol": {"folds": 2}, "compute": {"device": "cpu", "precision": "fp32", "channels_last": False},
          "arms": [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1}]}]}
WORDING = {"outcome_label": "admission to intensive care", "outcome_horizon": "within 30 days of the radiograph"}
# unit_fingerprint of RECIPE as stagewise computed it before the wording fields existed:
# the run directories made then must still resume
BEFORE = {"model": "d7d7b103de79677c", "baseline": "769b4e98f7ab4218"}


def _fingerprints(**cohort):
    d = json.loads(json.dumps(RECIPE))
    d["cohort"].update(cohort)
    r = recipe_from_dict(d)
    return {"model": unit_fingerprint(r, "model", r.arms[0], 1.0, None, "digest"),
            "baseline": unit_fingerprint(r, "baseline", None, 1.0, "x", "digest")}


def test_unset_wording_keeps_the_fingerprints_of_earlier_runs():
    assert _fingerprints() == BEFORE


def test_set_or_changed_wording_changes_no_fingerprint():
    assert _fingerprints(**WORDING) == _fingerprints() == BEFORE
    assert _fingerprints(outcome_label="ICU stay") == BEFORE
    assert _fingerprints(outcome="survival") != BEFORE  # the column itself does decide the numbers


def test_a_refusal_never_names_the_wording_as_a_difference():
    old = recipe_to_dict(recipe_from_dict(RECIPE))
    new = json.loads(json.dumps(RECIPE))
    new["cohort"].update(WORDING, patient="pid")
    diffs, newer = recipe_differences(old, recipe_to_dict(recipe_from_dict(new)), ("cohort.",))
    assert diffs == ['cohort.patient (run: "patient", now: "pid")'] and not newer
    del old["cohort"]["outcome_label"], old["cohort"]["outcome_horizon"]  # a run directory of an earlier stagewise
    assert recipe_differences(old, recipe_to_dict(recipe_from_dict(new)), ("cohort.",)) == (diffs, False)
