"""An external validation is external only when checked: a bundle records its training set
(training_set.json: salted pixel and patient-id digests, perceptual hashes, no name), and
`stagewise evaluate` counts the images and patients of its cohort that were in it, scores with
and without them, and does not call an overlapping cohort external."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from conftest import small_recipe
from stagewise.bundle import export_bundle
from stagewise.data import load_cohort, read_image
from stagewise.data.image_digest import NEAR_DUPLICATE_BITS, dhash, hamming
from stagewise.evaluation.splits import cohort_splits
from stagewise.external import ExternalOptions, evaluate_bundle
from stagewise.cli import app
from stagewise.recipe import recipe_from_dict
from stagewise.study import run_study

import yaml

PROBE = {"kind": "probe", "epochs": 2, "batch_size": 16, "lr": 1e-2}
ARGS = ["--image", "scan", "--outcome", "icu", "--patient", "pid", "--positive", "admitted", "--negative", "ward"]
OPTIONS = dict(image="scan", outcome="icu", patient="pid", positive=["admitted"], negative=["ward"], bootstrap=50)
N_NEW = 12
"""Digits per class of the other hospital that are not in the development cohort."""


@pytest.fixture(scope="module")
def study(digits_manifest, tmp_path_factory):
    """A study on the digits cohort (80 images, 40 patients), a refit bundle and a fold bundle."""
    out = tmp_path_factory.mktemp("overlap")
    recipe = small_recipe(digits_manifest, [{"name": "probe", "backbone": "scratch:resnet18", "stages": [PROBE]}],
                          compute={"save_models": True}, evaluation={"saliency": 0, "bootstrap": 0, "report": False})
    run_study(recipe, out / "run")
    return {"run": out / "run", "refit": export_bundle(out / "run", "probe", out / "refit", refit=True),
            "fold": export_bundle(out / "run", "probe", out / "fold", fold="r0-f0")}


def _save_digit(path, index):
    """A scikit-learn digit as make_demo_cohort writes one."""
    Image.fromarray((load_digits().images[index] / 16.0 * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def cohorts(digits_manifest, tmp_path_factory):
    """Another hospital's manifest (its own column names and coding) holding, besides 2 x N_NEW
    digits of its own, 6 development images under new names, one saved again as BMP (the same
    pixels), one with a pixel slightly changed (a near-duplicate), and one new image of a patient
    whose id is a development patient's; and the same manifest without those 9 rows."""
    folder = tmp_path_factory.mktemp("site-b")
    dev = pd.read_csv(digits_manifest)
    dev["file"] = [digits_manifest.parent / p for p in dev["path"]]
    rows, flags = [], []

    def add(path, outcome, pid, flag):
        rows.append({"scan": str(path), "icu": "admitted" if outcome else "ward", "pid": pid})
        flags.append(flag)

    for k, i in enumerate((0, 1, 2, 40, 41, 42)):
        shutil.copy(dev["file"][i], folder / f"copy-{k}.png")
        add(folder / f"copy-{k}.png", dev["outcome"][i], f"B-c{k}", "identical pixels")
    Image.open(dev["file"][3]).save(folder / "again.bmp")
    add(folder / "again.bmp", dev["outcome"][3], "B-r", "identical pixels")
    pixels = np.array(Image.open(dev["file"][43]))
    y, x = np.argwhere(pixels == 0)[0]
    pixels[y, x] = 12  # a faint speck on the background
    Image.fromarray(pixels).save(folder / "edited.png")
    add(folder / "edited.png", dev["outcome"][43], "B-e", "near-duplicate")
    digits = load_digits()
    # digits the development cohort (the first 40 of each) lacks; an 8 x 8 digit is so small that a
    # few distinct ones share a perceptual hash within NEAR_DUPLICATE_BITS of a development digit's:
    # those are left out, so that these are disjoint by every check
    seen = [dhash(read_image(f)) for f in dev["file"]]
    new = {3: [], 8: []}
    for d in (3, 8):
        for i in np.flatnonzero(digits.target == d)[40:]:
            path = folder / f"new-{d}-{len(new[d])}.png"
            _save_digit(path, i)
            if hamming([dhash(read_image(path))], seen).min() > NEAR_DUPLICATE_BITS:
                new[d].append(path)
            if len(new[d]) > N_NEW:
                break
    path = new[8].pop()  # the (N_NEW + 1)-th: a new image under a development patient's id
    path.rename(folder / "same-id.png")
    add(folder / "same-id.png", 1, dev["patient"][60], "patient id")
    for d, label in ((3, 0), (8, 1)):
        for k, path in enumerate(new[d][:N_NEW]):
            add(path, label, f"B-n{d}{k}", "")
    table = pd.DataFrame(rows)
    table.to_csv(folder / "mixed.csv", index=False)
    table[[f == "" for f in flags]].to_csv(folder / "disjoint.csv", index=False)
    return {"mixed": folder / "mixed.csv", "disjoint": folder / "disjoint.csv", "flags": flags,
            "ids": dev["patient"].unique().tolist(), "names": [p.rsplit("/", 1)[-1][:-4] for p in dev["path"]]}


def _differences(a, b, path="") -> list[str]:
    """Where two nested records differ: structure, or numbers by more than 1e-6 relative or 2e-5
    absolute (curves are stored rounded to 5 decimals: a last-bit difference can flip a rounding)."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [f"{path}: keys differ"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return [f"{path}: lengths differ"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)):
        return [] if b == pytest.approx(a, rel=1e-6, abs=2e-5, nan_ok=True) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _external_words(html: str) -> list[str]:
    """Each use of "external" in the page's visible text that is not a negation or a file name."""
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", html, flags=re.S))
    text = " ".join(text.replace("external.json", "").split())
    allowed = ("not an external validation", "not external", "not shown to be external")
    for phrase in allowed:
        text = text.replace(phrase, "")
    return [text[max(0, m.start() - 40): m.end() + 20] for m in re.finditer("external", text, flags=re.I)]


def test_an_evaluation_on_training_images_counts_them_and_is_not_called_external(study, cohorts, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", str(study["refit"]), str(cohorts["mixed"]), "-o", str(out), *ARGS,
                                      "--bootstrap", "50", "--recalibrate", "intercept"])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "external.json").read_text())
    ov = res["overlap"]
    assert ov["checked"] and ov["external"] is False and ov["training_set"] == {"images": 80, "patients": 40}
    assert (ov["images_identical"], ov["images_near_duplicate"], ov["patients_id_match"]) == (7, 1, 1)
    assert (ov["images_in_training_set"], ov["patients_with_training_images"]) == (8, 8)
    assert (ov["patients_overlapping"], ov["images_of_overlapping_patients"]) == (9, 9)
    assert ov["images"] == 9 + 2 * N_NEW
    images = pd.read_csv(out / "predictions-images.csv", keep_default_na=False)
    assert images["in_training_set"].tolist() == cohorts["flags"]
    # the figures without them are there, on the other patients
    without = res["without_overlap"]
    assert without["available"] and without["cohort"]["patients"] == 2 * N_NEW
    assert without["external"]["n_patients"] == 2 * N_NEW and "auroc_delong_ci" in without["external"]
    # no "external", no "never saw" anywhere a user reads it
    said = " ".join(result.output.split())
    assert "not an external validation" in said and "8 of 33 images (8 patients) were in the bundle's training set" in said
    assert "external [95" not in said and "without the patients in the training set (24 patients, 24 images):" in said
    html = (out / "report.html").read_text()
    assert "never saw" not in html and "unseen" not in html and _external_words(html) == []
    assert "8 of 33 images (8 patients) were in the bundle&#39;s training set" in html or \
        "8 of 33 images (8 patients) were in the bundle's training set" in html
    assert 'data-col="without"' in html and "Independence from development data" in html
    assert "never saw" not in res["about"] and res["about"].startswith("evaluation of a stagewise bundle")
    # the recalibrated bundle keeps the record of what trained the network, and says what it was fitted on
    recal = out / "bundle-recalibrated"
    before, after = (json.loads((b / "training_set.json").read_text()) for b in (study["refit"], recal))
    n_fit = res["recalibration"]["fitted_on"]["n_patients"]  # one image per patient here
    assert after["salt"] == before["salt"] and set(before["pixel_digests"]) <= set(after["pixel_digests"])
    assert len(after["pixel_digests"]) == 80 + n_fit and after["images"]["recalibration"] == n_fit
    card = (recal / "MODEL_CARD.md").read_text()
    assert "overlaps the bundle's training set (not external)" in card
    assert f"and the {n_fit} images its recalibration was fitted on" in card


def test_the_figures_without_overlap_are_those_of_the_manifest_without_those_rows(study, cohorts, tmp_path):
    mixed = evaluate_bundle(study["refit"], cohorts["mixed"], tmp_path / "mixed", ExternalOptions(**OPTIONS))
    clean = evaluate_bundle(study["refit"], cohorts["disjoint"], tmp_path / "clean", ExternalOptions(**OPTIONS))
    stored = json.loads((tmp_path / "mixed" / "external.json").read_text())["without_overlap"]
    again = json.loads((tmp_path / "clean" / "external.json").read_text())
    # the same figures (the network's float32 outputs differ in the last bits with the batch they are scored in)
    assert not _differences(stored["external"], again["external"]) + _differences(stored["comparison"], again["comparison"])
    assert stored["external"]["auroc_delong_ci"]["point"] == again["external"]["auroc_delong_ci"]["point"]
    assert stored["cohort"]["images_scored"] == again["cohort"]["images_scored"] == 2 * N_NEW
    assert mixed["overlap"]["external"] is False
    # the disjoint cohort is checked and called external, with no figures "without"
    ov = clean["overlap"]
    assert ov["external"] is True and ov["images_in_training_set"] == ov["patients_id_match"] == 0
    assert "without_overlap" not in clean and ov["sentence"].startswith("No image of this cohort (24 images) is in the bundle's training set (80 images, 40 patients)")
    html = (tmp_path / "clean" / "report.html").read_text()
    assert "stagewise external validation" in html and "no training image or patient was found" in html


def test_a_fold_bundle_records_its_folds_training_part_and_nothing_that_names_a_patient_or_file(
        study, cohorts, digits_manifest, tmp_path):
    recipe = recipe_from_dict(yaml.safe_load((study["run"] / "recipe.yaml").read_text()))
    cohort = load_cohort(recipe.cohort)
    train = next(s for s in cohort_splits(cohort.table, recipe.protocol, recipe.seed) if s.name == "r0-f0").train
    n_train_patients = cohort.table["patient"].iloc[train].nunique()
    for bundle, n_images, n_patients in ((study["refit"], 80, 40), (study["fold"], len(train), n_train_patients)):
        record = json.loads((bundle / "training_set.json").read_text())
        info = json.loads((bundle / "bundle.json").read_text())
        assert len(record["pixel_digests"]) == len(record["perceptual_hashes"]) == n_images
        assert len(record["patient_digests"]) == info["training_set"]["patients"] == n_patients
        assert info["training_set"]["images"] == n_images and info["training_set"]["file"] == "training_set.json"
        for name in ("training_set.json", "bundle.json", "MODEL_CARD.md"):
            text = (bundle / name).read_text()
            assert not any(p in text for p in cohorts["ids"]) and not any(n in text for n in cohorts["names"])
            assert ".png" not in text and str(digits_manifest.parent) not in text and "images/" not in text
        assert "Training set (`training_set.json`): for the" in (bundle / "MODEL_CARD.md").read_text()
    # the fold bundle on its own development cohort: exactly the fold's training images have identical pixels
    res = evaluate_bundle(study["fold"], digits_manifest, tmp_path / "dev", ExternalOptions(bootstrap=0))
    images = pd.read_csv(tmp_path / "dev" / "predictions-images.csv", keep_default_na=False)
    assert np.flatnonzero(images["in_training_set"] == "identical pixels").tolist() == train.tolist()
    assert res["overlap"]["external"] is False and res["overlap"]["images_identical"] == len(train)


def test_a_bundle_without_a_training_set_says_overlap_could_not_be_checked(study, cohorts, tmp_path):
    old = tmp_path / "old-bundle"
    shutil.copytree(study["refit"], old)
    (old / "training_set.json").unlink()
    info = json.loads((old / "bundle.json").read_text())
    info.pop("training_set"), info.pop("integrity")  # nor the digests of its files
    (old / "bundle.json").write_text(json.dumps(info))
    res = evaluate_bundle(old, cohorts["disjoint"], tmp_path / "eval", ExternalOptions(**OPTIONS))
    assert res["overlap"] == {"checked": False, "external": None, "sentence": res["overlap"]["sentence"]}
    assert "could not be checked" in res["overlap"]["sentence"] and "without_overlap" not in res
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "could not be checked" in html and "never saw" not in html and "overlap with its training set not checked" in html
    assert "this evaluation could not check it" in html  # the TRIPOD+AI item is left to the authors
    assert "stagewise external validation" not in html and "Development against external validation" not in html
    # an evaluation written before the check existed (no `overlap` in external.json) says so too
    from stagewise.report.html import write_external_report

    stored = json.loads((tmp_path / "eval" / "external.json").read_text())
    stored.pop("overlap")
    (tmp_path / "eval" / "external.json").write_text(json.dumps(stored))
    html = write_external_report(tmp_path / "eval").read_text()
    assert "did not check whether the cohort overlaps" in html and "stagewise external validation" not in html
