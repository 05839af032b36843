"""What used to print a traceback (or raw warnings) now says one clear thing: a full disk when
the run starts or while its report is written, a report into a folder that cannot be written,
numpy's RuntimeWarnings during a study (into log.txt), and a damaged fold (on screen too, not
in log.txt only). A full disk is simulated by writes that raise OSError(28)."""

import errno
import logging
import os
import pathlib
import warnings

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import small_recipe
from stagewise.cli import app
from stagewise.study import run_study
from stagewise.study import runner as study_runner

ARMS = [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1, "batch_size": 16}]}]
FULL = os.strerror(errno.ENOSPC)


def _recipe_file(digits_manifest, tmp_path, report=True):
    data = {"name": "t", "seed": 0, "cohort": {"manifest": str(digits_manifest)}, "data": {"image_size": 32},
            "protocol": {"folds": 2}, "compute": {"device": "cpu", "precision": "fp32", "channels_last": False},
            "evaluation": {"bootstrap": 0, "saliency": 0, "report": report}, "arms": ARMS}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class FullDisk:
    """A file opened on a full disk: opening works, every write fails."""

    def write(self, text):
        raise OSError(errno.ENOSPC, FULL)

    def flush(self):
        pass

    def close(self):
        pass


def _said(result, capfd) -> str:
    return " ".join((result.output + capfd.readouterr().err).split())


def test_a_full_disk_while_the_report_is_written_is_one_message(digits_manifest, tmp_path, monkeypatch, capfd):
    recipe = _recipe_file(digits_manifest, tmp_path)
    write_text = pathlib.Path.write_text

    def full_for_the_report(self, *args, **kwargs):
        if self.name == "report.html.tmp":
            raise OSError(errno.ENOSPC, FULL)
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_for_the_report)
    monkeypatch.setattr(logging.FileHandler, "_open", lambda self: FullDisk())  # log.txt fills up too
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "run")])
    said = _said(result, capfd)
    assert result.exit_code == 2, said
    assert f"report.html: {FULL}" in said and said.count("cannot write") == 2  # the report, and log.txt once
    assert "Traceback" not in said and "Logging error" not in said


def test_a_full_disk_when_the_run_starts_is_one_message(digits_manifest, tmp_path, monkeypatch, capfd):
    recipe = _recipe_file(digits_manifest, tmp_path)

    def full(self):
        raise OSError(errno.ENOSPC, FULL, self.baseFilename)

    monkeypatch.setattr(logging.FileHandler, "_open", full)  # log.txt cannot even be created
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "run")])
    said = _said(result, capfd)
    assert result.exit_code == 2 and f"log.txt: {FULL}" in said and "Traceback" not in said, said
    again = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "run")])
    assert "lock" not in again.output  # the lock was let go


def test_a_report_into_a_folder_that_cannot_be_written_is_one_message(digits_manifest, tmp_path, monkeypatch, capfd):
    run_study(small_recipe(digits_manifest, ARMS, protocol={"folds": 2},
                           evaluation={"bootstrap": 0, "saliency": 0, "report": False}), tmp_path / "run")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "run" / "report.html.tmp"))

    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    monkeypatch.setattr(os, "replace", read_only)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    said = _said(result, capfd)
    assert result.exit_code == 2 and os.strerror(errno.EROFS) in said and "Traceback" not in said, said


def test_numpy_runtime_warnings_go_to_the_log_not_the_screen(digits_manifest, tmp_path, monkeypatch, capsys):
    summary = study_runner.unit_summary

    def noisy(*args, **kwargs):
        np.mean(np.array([]))  # "Mean of empty slice", as a metric of a tiny fold may say
        return summary(*args, **kwargs)

    monkeypatch.setattr(study_runner, "unit_summary", noisy)
    recipe = small_recipe(digits_manifest, ARMS, protocol={"folds": 2},
                          evaluation={"bootstrap": 0, "saliency": 0, "report": False})
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        run_study(recipe, tmp_path / "run")
    err = capsys.readouterr().err
    assert "RuntimeWarning" not in err and "Mean of empty slice" not in err
    assert "RuntimeWarning: Mean of empty slice" in (tmp_path / "run" / "log.txt").read_text()


def test_a_damaged_fold_is_said_on_screen(digits_manifest, tmp_path, capsys):
    recipe = small_recipe(digits_manifest, ARMS, protocol={"folds": 2},
                          evaluation={"bootstrap": 0, "saliency": 0, "report": False})
    run_study(recipe, tmp_path / "run")
    fold = next((tmp_path / "run" / "folds" / "a").glob("r0-f0*.csv"))
    fold.write_text("damaged")
    run_study(recipe, tmp_path / "run")
    assert "damaged fold a/r0-f0" in capsys.readouterr().err
