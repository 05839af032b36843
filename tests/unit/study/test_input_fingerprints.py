"""A fold depends on every file its arm reads, not only on the cohort: a `file:` backbone's
weights, a pretrain stage's source manifest and its images. Replacing one of them must never
let a rerun read back the folds computed from the old one; arms that read no such file keep
the fingerprints of earlier runs (test_outcome_wording_fingerprint pins those)."""

import pandas as pd
import pytest

from conftest import small_recipe
from stagewise.errors import RunError
from stagewise.models import create_backbone
from stagewise.models.base import save_backbone
from stagewise.study import run_study
from stagewise.study.rundir import pretrain_fingerprint, unit_fingerprint

PROBE = {"kind": "probe", "epochs": 1, "batch_size": 16, "lr": 3e-3}


def _weights(path, seed):
    import torch

    torch.manual_seed(seed)
    return save_backbone(create_backbone("scratch:tinycnn"), path)


def test_a_replaced_weights_file_is_never_read_back_from_old_folds(digits_manifest, tmp_path):
    weights = _weights(tmp_path / "w.safetensors", 0)
    recipe = small_recipe(digits_manifest, [{"name": "a", "backbone": f"file:{weights}", "stages": [PROBE]}],
                          protocol={"folds": 2}, evaluation={"saliency": 0, "report": False, "bootstrap": 0})
    run_study(recipe, tmp_path / "run")
    run_study(recipe, tmp_path / "run")  # unchanged: read back
    _weights(weights, 1)  # same name, other weights
    with pytest.raises(RunError, match="weights file"):
        run_study(recipe, tmp_path / "run")


def test_a_relabelled_source_manifest_changes_the_fingerprints(digits_manifest, tmp_path):
    table = pd.read_csv(digits_manifest).head(20)
    table["path"] = [str(digits_manifest.parent / p) for p in table["path"]]
    own = tmp_path / "first.png"  # a copy of its own, so that the shared fixture's image stays as it is
    own.write_bytes(open(table["path"][0], "rb").read())
    table.loc[0, "path"] = str(own)
    table["ink"] = range(20)
    source = tmp_path / "source.csv"
    table.to_csv(source, index=False)
    pretrain = {"kind": "pretrain", "epochs": 1, "source": {"manifest": str(source), "targets": ["ink"],
                                                            "task": "regression"}}
    recipe = small_recipe(digits_manifest, [{"name": "a", "backbone": "scratch:tinycnn", "stages": [pretrain, PROBE]}])
    arm = recipe.arms[0]
    before = unit_fingerprint(recipe, "model", arm, 1.0, None, "cohort"), pretrain_fingerprint(recipe, arm)
    assert before == (unit_fingerprint(recipe, "model", arm, 1.0, None, "cohort"), pretrain_fingerprint(recipe, arm))
    table["ink"] = table["ink"][::-1].to_numpy()  # relabelled, same file name, same settings
    table.to_csv(source, index=False)
    relabelled = unit_fingerprint(recipe, "model", arm, 1.0, None, "cohort"), pretrain_fingerprint(recipe, arm)
    assert relabelled[0] != before[0] and relabelled[1] != before[1]
    with open(own, "ab") as f:  # one source image's bytes changed
        f.write(b"\0")
    assert unit_fingerprint(recipe, "model", arm, 1.0, None, "cohort") != relabelled[0]
