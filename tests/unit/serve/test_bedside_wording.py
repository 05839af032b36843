"""What the bedside page's API says about a result: a probability below the decision threshold
is stated neutrally (never "not flagged", never a reassuring class), one at or above it stays
flagged; the outcome is named in the recipe's words and time frame (its column when unset); a
heat map that cannot be drawn comes with a sentence saying why, never an empty image."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import small_recipe
from stagewise.bundle import Bundle, export_bundle
from stagewise.bundle.integrity import seal
from stagewise.serve import create_app
from stagewise.serve.wording import FLAT_MAP, NO_SPATIAL_MAP
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 1, "batch_size": 16, "lr": 1e-2}
LABEL, HORIZON = "admission to intensive care", "within 30 days of the radiograph"
STATIC = Path(__file__).parents[3] / "src" / "stagewise" / "serve" / "static"


@pytest.fixture(scope="module")
def bundle_dir(digits_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("bedside")
    recipe = small_recipe(digits_manifest, [{"name": "net", "backbone": "scratch:tinycnn", "stages": [PROBE]}],
                          protocol={"folds": 2}, compute={"save_models": True},
                          evaluation={"saliency": 0, "bootstrap": 0, "report": False})
    run_study(recipe, root / "run")
    return export_bundle(root / "run", "net", root / "bundle", fold="r0-f0")


@pytest.fixture(scope="module")
def worded_dir(bundle_dir):
    """The same bundle as exported from a recipe with cohort.outcome_label and outcome_horizon."""
    out = bundle_dir.parent / "worded"
    shutil.copytree(bundle_dir, out)
    info = json.loads((out / "bundle.json").read_text())
    info["tasks"][0] |= {"outcome_label": LABEL, "outcome_horizon": HORIZON}
    (out / "bundle.json").write_text(json.dumps(info))
    seal(out)  # as the export of that recipe would have recorded it
    return out


def _client(path, threshold=None):
    from fastapi.testclient import TestClient

    bundle = Bundle.load(path)
    if threshold is not None:
        bundle.info["tasks"][0]["threshold"] = threshold
    return TestClient(create_app(bundle))


def _score(client, png, endpoint="/predict"):
    r = client.post(endpoint, files={"file": ("scan.png", png.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def png(digits_manifest):
    return sorted((digits_manifest.parent / "images").glob("*.png"))[0]


def test_below_the_threshold_is_neutral_not_reassurance(bundle_dir, png):
    for endpoint in ("/predict", "/explain"):
        body = _score(_client(bundle_dir, threshold=0.999999), png, endpoint)
        o = body["outputs"][0]
        assert o["probability"] < o["threshold"] and o["decision"] is False
        assert o["state"] == "below_threshold"
        assert o["statement"] == "Below the decision threshold of 100.0 %"
        assert "not flagged" not in json.dumps(body).lower() and "negative" not in json.dumps(o).lower()


def test_at_or_above_the_threshold_stays_flagged(bundle_dir, png):
    o = _score(_client(bundle_dir, threshold=0.0), png)["outputs"][0]
    assert o["decision"] is True and o["state"] == "flagged"
    assert o["statement"] == "Flagged: at or above the decision threshold of 0.0 %"


def test_the_page_has_no_reassuring_wording_or_green_box():
    js, css = (STATIC / "app.js").read_text(), (STATIC / "style.css").read_text()
    assert "Not flagged" not in js and '"negative"' not in js
    assert ".decision.negative" not in css and "--neg" not in css
    below = next(line for line in css.splitlines() if line.startswith(".decision.below"))
    assert "--below-bg" in below and "--below-line" in below  # the neutral greys of :root


def test_the_outcome_is_named_in_the_recipes_words(worded_dir, png):
    client = _client(worded_dir)
    o = _score(client, png)["outputs"][0]
    assert (o["outcome"], o["outcome_label"], o["outcome_horizon"]) == ("outcome", LABEL, HORIZON)
    assert o["outcome_text"] == f"{LABEL} {HORIZON}"
    card = client.get("/model-card").json()
    assert card["outputs"][0]["outcome_text"] == f"{LABEL} {HORIZON}"
    assert f"probability of {LABEL} {HORIZON} from" in card["intended_use"]


def test_unworded_the_column_names_the_outcome(bundle_dir, png):
    client = _client(bundle_dir)
    o = _score(client, png)["outputs"][0]
    assert o["outcome_text"] == "outcome" and o["outcome_label"] is None and o["outcome_horizon"] is None
    assert "probability of outcome from" in client.get("/model-card").json()["intended_use"]


def test_a_heat_map_that_is_zero_everywhere_says_why(bundle_dir, png, monkeypatch):
    from stagewise.serve.scorer import Scorer

    client = _client(bundle_dir)
    drawn = _score(client, png, "/explain")
    assert drawn["saliency"][0]["image"] and drawn["saliency"][0]["note"] is None and drawn["saliency_note"] is None
    monkeypatch.setattr(Scorer, "saliency", lambda self, scored: [np.zeros((32, 32), np.float32)])
    body = _score(client, png, "/explain")
    assert body["saliency"][0]["image"] is None and body["saliency"][0]["note"] == FLAT_MAP
    assert body["saliency_note"] == FLAT_MAP and "zero everywhere" in FLAT_MAP
    monkeypatch.setattr(Scorer, "saliency", lambda self, scored: [None])
    body = _score(client, png, "/explain")
    assert body["saliency"][0]["image"] is None and body["saliency_note"] == NO_SPATIAL_MAP
