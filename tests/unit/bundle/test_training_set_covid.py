"""On the real covid cohorts: what the overlap check finds between the covid-outcome manifest
(ieee8023, which holds 82 Hannover images under new names and patient ids) and the Hannover
repository, with and without `prepare_covid_outcome.py --without-hannover` (the README's figures)."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stagewise.bundle.training_set import find_overlap, record_training_set
from stagewise.data import load_cohort
from stagewise.recipe import recipe_from_dict

REPO = Path(__file__).resolve().parents[3]
DATA = REPO.parent / "shared" / "data"
HANNOVER = DATA / "covid-cxr-outcome" / "hannover"
pytestmark = pytest.mark.skipif(not (HANNOVER / "labels_derived.csv").is_file(), reason="needs ../shared/data")


@pytest.fixture(scope="module")
def prepare():
    sys.path.insert(0, str(REPO / "examples"))
    import prepare_covid_outcome

    yield prepare_covid_outcome
    sys.path.remove(str(REPO / "examples"))


def _overlap(manifest: Path):
    recipe = recipe_from_dict({"name": "t", "cohort": {"manifest": str(manifest), "outcome": "went_icu",
                                                       "positive": ["Y"], "negative": ["N"]},
                               "arms": [{"name": "a", "backbone": "scratch:tinycnn",
                                         "stages": [{"kind": "probe", "epochs": 1}]}]})
    record = record_training_set(recipe, load_cohort(recipe.cohort), ["a"], None)
    han = pd.read_csv(HANNOVER / "labels_derived.csv", dtype=str, keep_default_na=False)
    return record, find_overlap(record, [str(HANNOVER / p) for p in han["png_file"]], han["patient_id"].tolist()), han


def test_without_hannover_leaves_out_the_82_hannover_rows_and_nothing_of_hannover_is_found(prepare, tmp_path):
    assert prepare.main(["--data", str(DATA), "--out", str(tmp_path / "all.csv")]) == 0
    assert prepare.main(["--data", str(DATA), "--out", str(tmp_path / "without.csv"), "--without-hannover"]) == 0
    full, rest = pd.read_csv(tmp_path / "all.csv"), pd.read_csv(tmp_path / "without.csv")
    assert len(full) - len(rest) == 82 == int(full["hannover"].sum()) and rest["hannover"].sum() == 0
    assert set(rest["path"]) == set(full.loc[full["hannover"] == 0, "path"])

    record, found, han = _overlap(tmp_path / "all.csv")
    assert len(record["pixel_digests"]) == len(full)
    patients = han["patient_id"].to_numpy()
    copies = np.isin([Path(p).stem for p in han["png_file"]], [Path(p).stem for p in full.loc[full["hannover"] == 1, "path"]])
    assert copies.sum() == 82
    # no copy has the same pixels (re-cropped, rotated); 17 are near-duplicates, all of them true copies
    assert found.identical.sum() == 0 and found.near.sum() == 17 and not (found.near & ~copies).any()
    assert len(set(patients[found.near])) == 16 and not found.patient.any()

    _, clean, _ = _overlap(tmp_path / "without.csv")
    assert not (clean.identical | clean.near | clean.patient).any()
