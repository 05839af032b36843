"""External validation (`stagewise evaluate`): a bundle on another cohort, its figures, the
recalibrated bundle, and a clear error for every kind of bad input."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from conftest import small_recipe
from stagewise.cli import app
from stagewise.bundle import Bundle, export_bundle
from stagewise.bundle.integrity import seal
from stagewise.evaluation.calibration import apply_recalibration, calibration_slope_intercept
from stagewise.external import EvaluateError, ExternalOptions, evaluate_bundle
from stagewise.external.validation import recalibration
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 3, "batch_size": 16, "lr": 1e-2}


@pytest.fixture(scope="module")
def bundle_dir(digits_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("external")
    recipe = small_recipe(digits_manifest, [{"name": "probe", "backbone": "scratch:resnet18", "stages": [PROBE]}],
                          compute={"save_models": True}, evaluation={"saliency": 0, "bootstrap": 0, "report": False})
    run_study(recipe, out / "run")
    return export_bundle(out / "run", "probe", out / "bundle", fold="r0-f0")


@pytest.fixture(scope="module")
def site_b(digits_manifest, tmp_path_factory):
    """The digits cohort as another hospital writes it: other column names, yes/no outcomes,
    an outcome coding of its own, two sites, absolute image paths."""
    folder = tmp_path_factory.mktemp("site-b")
    m = pd.read_csv(digits_manifest)
    table = pd.DataFrame({
        "scan": [str((digits_manifest.parent / p).resolve()) for p in m["path"]],
        "icu": np.where(m["outcome"] == 1, "admitted", "ward"),
        "pid": "B-" + m["patient"],
        "hospital": np.where(np.arange(len(m)) % 4 < 2, "north", "south"),
    })
    path = folder / "site-b.csv"
    table.to_csv(path, index=False)
    return path


def _options(**kw):
    base = dict(image="scan", outcome="icu", patient="pid", site="hospital", positive=["admitted"], negative=["ward"],
                bootstrap=200)
    return ExternalOptions(**(base | kw))


def test_cli_evaluate_with_recalibration_writes_shareable_figures_and_a_bundle_that_applies_it(bundle_dir, site_b, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "evaluate", str(bundle_dir), str(site_b), "-o", str(out), "--image", "scan", "--outcome", "icu", "--patient", "pid",
        "--site", "hospital", "--positive", "admitted", "--negative", "ward", "--recalibrate", "slope", "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "external.json").read_text())
    patients = pd.read_csv(out / "predictions-patients.csv")
    images = pd.read_csv(out / "predictions-images.csv")
    # the figures are those of the per-patient predictions at the bundle's own threshold
    threshold = json.loads((bundle_dir / "bundle.json").read_text())["tasks"][0]["threshold"]
    ext = res["external"]
    assert ext["auroc_delong_ci"]["point"] == pytest.approx(roc_auc_score(patients["y"], patients["score"]))
    y, d = patients["y"].to_numpy(), patients["score"].to_numpy() >= threshold
    assert ext["at_threshold"]["sensitivity"] == pytest.approx(d[y == 1].mean())
    assert ext["at_threshold"]["specificity"] == pytest.approx((~d[y == 0]).mean())
    ci = ext["bootstrap_ci"]["sensitivity"]
    assert ci["point"] == ext["at_threshold"]["sensitivity"] and 0 <= ci["low"] <= ci["high"] <= 1
    assert set(ext["sites"]) == {"north", "south"} and res["cohort"]["patients"] == len(patients)
    assert {r["metric"] for r in res["comparison"]} >= {"auroc", "sensitivity", "brier", "calibration_intercept"}
    assert res["development"]["available"] and res["development"]["cv"]["auroc"]["n"] == 3
    # test_images: first (the bundle's protocol default is all): every image scored here
    assert images["used_for_patient_score"].all() and len(images) == res["cohort"]["images"]
    # nothing shareable names a patient, an image file or a folder
    for name in ("external.json", "report.html"):
        text = (out / name).read_text()
        assert "B-p" not in text and ".png" not in text and str(tmp_path) not in text and "site-b.csv" not in text
    html = (out / "report.html").read_text()
    assert "TRIPOD+AI" in html and "Model updating" in html and 'id="fig-recalibration"' in html
    # the recalibrated bundle applies the recorded map in predict (torch and ONNX), keeping the decisions
    rec = res["recalibration"]
    new = Bundle.load(out / "bundle-recalibrated")
    task = new.info["tasks"][0]
    assert task["recalibration"]["slope"] == pytest.approx(rec["slope"]) and task["recalibration"]["fitted_on"]["n_patients"] == rec["fitted_on"]["n_patients"]
    files = images["image"].tolist()[:8]
    before, after = Bundle.load(bundle_dir).predict(files), new.predict(files)
    expected = apply_recalibration(before["probability:probe"], rec["intercept"], rec["slope"])
    np.testing.assert_allclose(after["probability:probe"], expected, atol=1e-6)
    np.testing.assert_allclose(new.predict(files, engine="onnx")["probability:probe"], expected, atol=1e-4)
    assert (after["decision:probe"] == before["decision:probe"]).all()
    # the figures at the threshold stay true: the mapped out-of-fold patient scores at the mapped threshold
    at = task["at_threshold"]
    patients_oof = json.loads((out / "bundle-recalibrated" / "oof.json").read_text())["outputs"]["probe"]["patients"]
    yy, dd = np.asarray(patients_oof["label"]), np.asarray(patients_oof["score"]) >= task["threshold"]
    assert at["threshold"] == task["threshold"] and at["sensitivity"]["point"] == pytest.approx(dd[yy == 1].mean())
    assert at == {**Bundle.load(bundle_dir).info["tasks"][0]["at_threshold"], "threshold": task["threshold"]}
    from stagewise.serve.scorer import Scorer  # the bedside page scores through the same map

    served = Scorer(new, engine="onnx").probabilities(new.images(files))[:, 0]
    np.testing.assert_allclose(served, expected, atol=1e-4)
    assert "Recalibrated" in (out / "bundle-recalibrated" / "MODEL_CARD.md").read_text()


def test_an_older_bundle_says_its_intensity_convention_in_the_evaluation(bundle_dir, site_b, tmp_path):
    """A bundle made before the intensity convention was recorded still validates; the CLI,
    external.json and the report say its DICOM inputs may be on another scale than in training."""
    import shutil

    old = tmp_path / "old-bundle"
    shutil.copytree(bundle_dir, old)
    info = json.loads((old / "bundle.json").read_text())
    assert info.pop("intensity")["convention"] == "storable-range-v1"
    info.pop("integrity")  # nor the digests of its files
    (old / "bundle.json").write_text(json.dumps(info))
    args = ["--image", "scan", "--outcome", "icu", "--patient", "pid", "--positive", "admitted", "--negative", "ward",
            "--bootstrap", "0"]
    for bundle, out, said in ((bundle_dir, tmp_path / "new", False), (old, tmp_path / "old", True)):
        result = CliRunner().invoke(app, ["evaluate", str(bundle), str(site_b), "-o", str(out), *args])
        assert result.exit_code == 0, result.output
        assert ("earlier intensity convention" in " ".join(result.output.split())) is said
        notice = json.loads((out / "external.json").read_text())["bundle"]["intensity_notice"]
        assert (notice is not None) is said
        html = (out / "report.html").read_text()
        assert ('id="intensity-notice"' in html) is said
        assert ("intensities read by storable-range-v1, as in development" in html) is not said  # TRIPOD+AI item
    assert "export it again from its run" in notice


def test_recalibration_makes_a_miscalibrated_score_calibrated_on_held_out_patients():
    # 600 patients whose true risk is p; the model says sigmoid(1.5 + 2 logit p): too high and too extreme
    rng = np.random.default_rng(3)
    lp = rng.normal(-0.5, 1.2, 600)
    y = (rng.random(600) < 1 / (1 + np.exp(-lp))).astype(int)
    score = 1 / (1 + np.exp(-(1.5 + 2.0 * lp)))
    table = pd.DataFrame({"patient": [f"p{i}" for i in range(600)], "y": y, "score": score})
    record, fit = recalibration(table, "slope", 0.5, 0.5, n_boot=0, seed=0)
    assert abs(fit.mean() - 0.5) < 0.02 and record["held_out"]["n_patients"] == (~fit).sum()
    before, after = record["before"]["calibration"], record["after"]["calibration"]
    assert before["intercept"] < -0.8 and before["slope"] < 0.65  # held out, as exported: miscalibrated
    assert abs(after["intercept"]) < 0.2 and after["slope_low"] < 1 < after["slope_high"]
    assert after["brier"] < before["brier"]
    assert record["after"]["auroc_delong_ci"]["point"] == pytest.approx(record["before"]["auroc_delong_ci"]["point"])
    # intercept-only recalibration fixes calibration-in-the-large and leaves the slope alone
    record, _ = recalibration(table, "intercept", 0.5, 0.5, n_boot=0, seed=0)
    assert record["slope"] == 1.0 and abs(record["after"]["calibration"]["intercept"]) < 0.2
    held = table[~fit]
    assert calibration_slope_intercept(held["y"], held["score"])["slope"] == pytest.approx(before["slope"])


def _cli(*args):
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())  # the console wraps long lines


def _manifest(tmp_path, site_b, edit=None):
    m = pd.read_csv(site_b)
    if edit:
        m = edit(m)
    path = tmp_path / "bad.csv"
    m.to_csv(path, index=False)
    return path


MAPPING = ["--image", "scan", "--outcome", "icu", "--patient", "pid", "--positive", "admitted", "--negative", "ward",
           "--bootstrap", "0"]


def test_not_a_bundle_and_missing_manifest(bundle_dir, site_b, tmp_path):
    assert "not a stagewise bundle" in _cli(tmp_path, site_b, "-o", tmp_path / "o", *MAPPING)
    assert "manifest not found" in _cli(bundle_dir, tmp_path / "nope.csv", "-o", tmp_path / "o", *MAPPING)


def test_every_manifest_problem_at_once_by_row(bundle_dir, site_b, tmp_path):
    def edit(m):
        m.loc[2, "icu"] = "maybe"                         # row 4: an outcome value no option maps
        m.loc[5, "scan"] = str(tmp_path / "gone.png")       # row 7: a missing file
        m.loc[8, "pid"] = ""                               # row 10: no patient
        (tmp_path / "broken.png").write_bytes(b"not a png")
        m.loc[9, "scan"] = str(tmp_path / "broken.png")     # row 11: a file that is no image
        return m

    text = _cli(bundle_dir, _manifest(tmp_path, site_b, edit=edit), "-o", tmp_path / "o", *MAPPING)
    assert "4 problems" in text
    assert "row 4" in text and "'maybe'" in text and "--positive / --negative" in text
    assert "row 7" in text and "gone.png" in text and "image file not found" in text
    assert "row 10" in text and "patient id" in text
    assert "row 11" in text and "broken.png" in text
    assert not (tmp_path / "o" / "external.json").exists()


def test_wrong_columns_and_default_outcome_coding_are_named(bundle_dir, site_b, tmp_path):
    text = _cli(bundle_dir, site_b, "-o", tmp_path / "o", "--image", "scan", "--patient", "pid", "--outcome", "icus")
    assert "column 'icus' (--outcome) is not in the manifest" in text and "did you mean 'icu'" in text
    # the bundle's own coding (1/0, yes/no, true/false, ...) does not know admitted/ward: the rows are named
    text = _cli(bundle_dir, site_b, "-o", tmp_path / "o", "--image", "scan", "--patient", "pid", "--outcome", "icu")
    assert "row 2" in text and "'ward'" in text and "--positive / --negative" in text and "recipe" not in text


def test_one_class_cohort_and_volumes_for_a_2d_bundle(bundle_dir, site_b, tmp_path):
    text = _cli(bundle_dir, _manifest(tmp_path, site_b, edit=lambda m: m[m["icu"] == "admitted"]), "-o", tmp_path / "o",
                *MAPPING)
    assert "positive outcome" in text and "both classes" in text
    import nibabel as nib

    vols = []
    for i in range(4):
        path = tmp_path / f"vol{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((12, 12, 12)).astype(np.float32), np.eye(4)), path)
        vols.append(str(path))
    m = pd.DataFrame({"scan": vols, "icu": ["admitted", "ward", "admitted", "ward"], "pid": ["a", "b", "c", "d"]})
    m.to_csv(tmp_path / "vols.csv", index=False)
    assert "3D volumes; this bundle scores 2D images" in _cli(bundle_dir, tmp_path / "vols.csv", "-o", tmp_path / "o",
                                                              *MAPPING)


def test_bad_options_all_at_once_and_a_foreign_output_folder(bundle_dir, site_b, tmp_path):
    text = _cli(bundle_dir, site_b, "-o", tmp_path / "o", *MAPPING, "--recalibrate", "platt", "--fit-fraction", "1.5",
                "--output", "nope", "--images", "some")
    for part in ("--recalibrate 'platt'", "--fit-fraction 1.5", "--output 'nope'", "--images 'some'"):
        assert part in text
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "report.html").write_text("my own report")
    assert "no `stagewise evaluate` wrote there" in _cli(bundle_dir, site_b, "-o", foreign, *MAPPING)
    assert (foreign / "report.html").read_text() == "my own report"


def test_recalibration_that_cannot_be_fitted_says_which_option_to_change(bundle_dir, site_b, tmp_path):
    with pytest.raises(EvaluateError, match="--fit-fraction"):
        evaluate_bundle(bundle_dir, site_b, tmp_path / "o", _options(recalibrate="intercept", fit_fraction=0.02,
                                                                       bootstrap=0))


def test_a_model_ranking_the_new_patients_backwards_is_not_recalibrated():
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 40)
    score = np.clip(0.7 - 0.4 * y + rng.normal(0, 0.1, 80), 0.01, 0.99)  # positives score lower
    table = pd.DataFrame({"patient": [f"p{i}" for i in range(80)], "y": y, "score": score})
    with pytest.raises(EvaluateError, match="ranks the wrong way round"):
        recalibration(table, "slope", 0.5, 0.5, n_boot=0, seed=0)


def test_the_evaluation_names_the_outcome_in_the_bundles_words(bundle_dir, site_b, tmp_path):
    """A bundle whose recipe worded its outcome (cohort.outcome_label / outcome_horizon): the
    external report and its checklist quote those words, so both cohorts' definitions and
    time frames can be compared."""
    import shutil

    worded = tmp_path / "worded"
    shutil.copytree(bundle_dir, worded)
    info = json.loads((worded / "bundle.json").read_text())
    info["tasks"][0] |= {"outcome_label": "admission to intensive care", "outcome_horizon": "within 30 days of the radiograph"}
    (worded / "bundle.json").write_text(json.dumps(info))
    seal(worded)  # as the export of that recipe would have recorded it
    phrase = "admission to intensive care within 30 days of the radiograph (column outcome)"
    evaluate_bundle(worded, site_b, tmp_path / "eval", options=_options(bootstrap=0))
    res = json.loads((tmp_path / "eval" / "external.json").read_text())
    assert res["bundle"]["outcome_text"] == phrase
    html = (tmp_path / "eval" / "report.html").read_text()
    assert f"outcome <b>{phrase}</b>" in html and f"the bundle predicts {phrase}: check" in html
