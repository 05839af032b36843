"""The report's "What this study shows" box holds exactly the sentences metrics.json holds."""

import html
import json

import numpy as np
import pandas as pd

from conftest import small_recipe
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 1, "batch_size": 16, "lr": 3e-3}


def test_report_states_the_conclusions_metrics_json_holds(digits_manifest, tmp_path):
    table = pd.read_csv(digits_manifest)
    rng = np.random.default_rng(0)
    noise = {p: rng.normal() for p in table["patient"].unique()}
    table["grade"] = table["outcome"] * 1.5 + table["patient"].map(noise)  # a strong no-image shortcut
    manifest = digits_manifest.with_name("conclusions_cohort.csv")
    table.to_csv(manifest, index=False)
    arms = [{"name": "a", "backbone": "scratch:tinycnn", "stages": [PROBE]},
            {"name": "b", "backbone": "scratch:tinycnn", "stages": [{**PROBE, "lr": 1e-2}]}]
    recipe = small_recipe(manifest, arms, cohort={"manifest": str(manifest), "baselines": ["grade"]},
                          protocol={"folds": 2, "repeats": 1}, evaluation={"bootstrap": 0, "saliency": 0})
    run_study(recipe, tmp_path / "run")
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    summary = metrics["evidence"]["summary"]
    # primary (b vs a), b vs grade, a vs grade, and whether any image arm beats the baseline
    assert len(summary) == 4 and summary[0].startswith("Primary comparison: b ")
    assert any("the no-image baseline baseline:grade" in s for s in summary[1:3])
    assert "image arm" in summary[3] and "baseline:grade" in summary[3]
    page = html.unescape((tmp_path / "run/report.html").read_text(encoding="utf-8"))
    box = page[page.index('<section id="conclusions">'):page.index('<section id="cohort">')]
    assert "What this study shows" in box
    for sentence in summary:
        assert f"<li>{sentence}</li>" in box
