"""Scoring one fold: a model's scores that are not finite stop the fold with the reason."""

import numpy as np
import pytest

from conftest import small_recipe
from stagewise.data import load_cohort
from stagewise.evaluation.fold_scores import score_fold
from stagewise.evaluation.splits import make_splits


def _fold(digits_manifest):
    recipe = small_recipe(digits_manifest, [{"name": "probe", "backbone": "scratch:tinycnn",
                                             "stages": [{"kind": "probe"}]}])
    cohort = load_cohort(recipe.cohort)
    y = cohort.targets()[:, 0]
    split = make_splits(y, cohort.table["patient"].to_numpy(), recipe.protocol, recipe.seed)[0]
    rng = np.random.default_rng(0)
    return recipe, cohort, split, rng.random(len(split.train)), rng.random(len(split.test))


def test_a_diverged_models_scores_stop_the_fold_naming_unit_fold_and_fix(digits_manifest):
    recipe, cohort, split, p_train, p_test = _fold(digits_manifest)
    metrics, _ = score_fold(recipe, cohort, split, split.train, p_train, p_test, model="probe")
    assert metrics["n_test_patients"] > 0
    p_test[:3] = np.nan
    p_train[0] = np.inf
    with pytest.raises(FloatingPointError, match=rf"probe {split.name}: 4 of \d+ scores are not finite.*diverged.*lr"):
        score_fold(recipe, cohort, split, split.train, p_train, p_test, model="probe")
    # a baseline's missing values (NaN) are rows left out, as before
    p_train[0] = np.nan
    metrics, _ = score_fold(recipe, cohort, split, split.train, p_train, p_test)
    assert 0 < metrics["n_test_patients"] < len(np.unique(cohort.table["patient"].to_numpy()[split.test]))
