"""Two hospitals' manifests may share a file name (`cohort.csv`): the second evaluation must
never replace the first without a word. By default it goes to a new folder, which the
command names; under `-o` a folder holding another manifest's evaluation is refused."""

import pandas as pd
import pytest
from typer.testing import CliRunner

import stagewise.external as external
from stagewise.cli import app
from stagewise.errors import RunError
from stagewise.external.outputs import RESULTS, default_folder, prepare_folder, write_results


def _manifests(tmp_path):
    a, b = tmp_path / "hospital-a" / "cohort.csv", tmp_path / "hospital-b" / "cohort.csv"
    for m in (a, b):
        m.parent.mkdir()
        m.write_text("path,outcome\n")
    return a, b


def _fake_evaluate(bundle, manifest, out, options, engine):
    prepare_folder(out, manifest)
    write_results(out, {"stagewise": "x", "manifest": str(manifest)}, pd.DataFrame(), pd.DataFrame(), manifest)
    (out / RESULTS).write_text(str(manifest))
    return {"bundle": {}, "overlap": {"external": True, "sentence": "none in the training set."}, "comparison": []}


def test_an_evaluation_of_another_manifest_of_the_same_name_goes_to_a_new_named_folder(tmp_path, monkeypatch):
    a, b = _manifests(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(external, "evaluate_bundle", _fake_evaluate)
    first = CliRunner().invoke(app, ["evaluate", "bundle", str(a)])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(app, ["evaluate", "bundle", str(b)])
    assert second.exit_code == 0, second.output
    assert "this one goes to evaluations/cohort-2" in " ".join(second.output.split())
    assert (tmp_path / "evaluations" / "cohort" / RESULTS).read_text() == str(a)  # the first is kept
    assert (tmp_path / "evaluations" / "cohort-2" / RESULTS).read_text() == str(b)
    again = CliRunner().invoke(app, ["evaluate", "bundle", str(a)])  # a rerun of the same manifest: its own folder
    assert again.exit_code == 0 and "goes to" not in again.output
    assert default_folder(a) == default_folder(a.resolve()) == tmp_path.joinpath("evaluations", "cohort").relative_to(tmp_path)


def test_an_output_folder_holding_another_manifests_evaluation_is_refused(tmp_path):
    a, b = _manifests(tmp_path)
    out = tmp_path / "eval"
    _fake_evaluate(None, a, out, None, None)
    with pytest.raises(RunError, match="earlier evaluation of another manifest.*nothing was replaced"):
        prepare_folder(out, b)
    prepare_folder(out, a)  # the same manifest again: a rerun
    assert (out / RESULTS).read_text() == str(a)
