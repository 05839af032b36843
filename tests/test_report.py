"""The HTML report: one self-contained file whose numbers are metrics.json's, with user text escaped."""

import base64
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from conftest import small_recipe
from stagewise.report.html import fmt_num, fmt_p, write_report
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 2, "batch_size": 16, "lr": 3e-3}
STUDY_NAME = "<b>bold</b> study <script>alert(1)</script>"


class ReportParser(HTMLParser):
    """Tags, images, table cells by data-col in rows with data-unit / data-a, and section ids."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.images: list[dict] = []
        self.ids: set[str] = set()
        self.tables: dict[str, list[dict]] = {}
        self._table = None
        self._row = None
        self._cell = None
        self._text: list[str] = []
        self.h1 = ""
        self._in_h1 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = a.get("id")
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table:
            self._row = {"attrs": a, "cells": {}}
        elif tag == "td" and self._row is not None:
            self._cell, self._text = a.get("data-col"), []
        elif tag == "h1":
            self._in_h1 = True

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None:
            if self._cell:
                self._row["cells"][self._cell] = "".join(self._text).strip()
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row["cells"]:
                self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "h1":
            self._in_h1 = False

    def handle_data(self, data):
        if self._cell is not None:
            self._text.append(data)
        if self._in_h1:
            self.h1 += data


@pytest.fixture(scope="module")
def run(digits_manifest, tmp_path_factory):
    """One small study: a tuned probe arm at full and half labels, two baselines, a clinical model."""
    table = pd.read_csv(digits_manifest)
    rng = np.random.default_rng(0)
    noise = {p: rng.normal() for p in table["patient"].unique()}
    table["grade"] = table["outcome"] * 1.5 + table["patient"].map(noise)
    table["noise"] = table["patient"].map(noise)
    table["age"] = table["patient"].map(noise) * 0.5 + table["outcome"] * 2.0
    table.loc[::7, "age"] = np.nan
    manifest = digits_manifest.with_name("report_cohort.csv")
    table.to_csv(manifest, index=False)
    arm = {"name": "probe", "backbone": "scratch:resnet18", "stages": [PROBE],
           "tune": {"grid": {"stages.0.lr": [1e-3, 3e-3]}, "inner_folds": 2}}
    recipe = small_recipe(
        manifest, [arm], name=STUDY_NAME,
        cohort={"manifest": str(manifest), "baselines": ["grade", "noise"], "clinical": ["age"]},
        protocol={"folds": 3, "repeats": 1, "label_fractions": [0.5]},
        evaluation={"bootstrap": 200, "saliency": 1},
    )
    out = tmp_path_factory.mktemp("report") / "run"
    result = run_study(recipe, out)
    (out / "report.html").unlink(missing_ok=True)
    path = write_report(out)
    html = path.read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(html)
    parser.close()
    return {"dir": out, "path": path, "html": html, "doc": parser, "metrics": result.metrics}


def test_report_is_one_self_contained_file(run):
    assert run["path"] == run["dir"] / "report.html"
    html, doc = run["html"], run["doc"]
    assert html.startswith("<!DOCTYPE html>") and "</html>" in html
    assert "script" not in doc.tags and "link" not in doc.tags  # no JavaScript, no external CSS
    assert "http://" not in html and "https://" not in html
    assert all(img["src"].startswith("data:image/png;base64,") for img in doc.images)
    assert len(html) < 3_000_000


def test_every_unit_and_comparison_appears(run):
    m, doc = run["metrics"], run["doc"]
    rows = doc.tables["units-table"]
    assert [r["attrs"]["data-unit"] for r in rows] == [
        "probe", "probe@0.5", "clinical", "baseline:grade", "baseline:noise"]  # models, clinical, baselines
    assert {r["attrs"]["data-unit"] for r in rows} == set(m["arms"])
    pairs = [(c["a"], c["b"]) for c in m["evidence"]["comparisons"]]
    assert pairs
    shown = [(r["attrs"]["data-a"], r["attrs"]["data-b"]) for r in doc.tables["comparisons-table"]]
    assert shown == pairs


def test_arms_table_numbers_are_metrics_json_values(run):
    m = run["metrics"]
    ev = m["evidence"]["units"]
    rows = {r["attrs"]["data-unit"]: r["cells"] for r in run["doc"].tables["units-table"]}
    for name, arm in m["arms"].items():
        cells = rows[name]
        for metric in ("auroc", "balanced_accuracy", "f1"):
            s = arm["summary"][metric]
            assert cells[metric] == f"{s['mean']:.3f} ± {s['sd']:.3f}", (name, metric)
        b = ev[name]["bootstrap_ci"]["auroc"]
        assert cells["auroc_bootstrap"] == f"{b['point']:.3f} [{b['low']:.3f}, {b['high']:.3f}]"
        d = ev[name]["auroc_delong_ci"]
        assert cells["auroc_delong"] == f"[{d['low']:.3f}, {d['high']:.3f}]"
        assert cells["kind"] == arm["kind"]
        assert cells["backbone"] == arm["backbone"]
    assert rows["probe@0.5"]["labels"] == "50 %" and rows["probe"]["labels"] == "100 %"


def test_comparison_numbers_and_p_values(run):
    rows = {(r["attrs"]["data-a"], r["attrs"]["data-b"]): r["cells"] for r in run["doc"].tables["comparisons-table"]}
    for c in run["metrics"]["evidence"]["comparisons"]:
        cells = rows[(c["a"], c["b"])]
        assert cells["delong_diff"] == f"{c['delong']['diff']:.3f}".replace("-", "\u2212")
        assert cells["delong_p"] == ("< 0.001" if c["delong"]["p"] < 0.001 else f"{c['delong']['p']:.3f}")
        assert cells["t_p"] == fmt_p(c["corrected_t"]["p"])
        assert cells["w_p"] == (fmt_p(c["wilcoxon"]["p"]) if "wilcoxon" in c else "\u2014")


def test_formatters():
    assert fmt_p(0.0004) == "< 0.001"
    assert fmt_p(0.0123) == "0.012"
    assert fmt_p(None) == fmt_p(float("nan")) == "\u2014"
    assert fmt_num(-0.0721) == "\u22120.072"
    assert fmt_num(-0.0001) == "0.000"


def test_figures_are_embedded_with_names(run):
    by_id = {img.get("id"): img for img in run["doc"].images}
    for fig in ("fig-roc", "fig-calibration", "fig-decision", "fig-label-efficiency"):
        assert fig in by_id, fig
        png = base64.b64decode(by_id[fig]["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert by_id[fig].get("alt")
    saliency = [img for img in run["doc"].images if img.get("class") == "saliency"]
    expected = sum(len(a.get("saliency", [])) for a in run["metrics"]["arms"].values())
    assert expected and len(saliency) == expected
    assert all(img["alt"].startswith("saliency map") for img in saliency)


def test_sections_checklist_and_tuning(run):
    doc, html = run["doc"], run["html"]
    for section in ("cohort", "summary", "comparisons", "discrimination", "calibration", "label-efficiency",
                    "tuning", "saliency", "checklist", "recipe"):
        assert section in doc.ids, section
    assert {"checklist-auto", "checklist-user"} <= doc.ids
    for item in ("Data partition", "pretrained-weight source", "CutMix", "stopping rule", "Threshold selection",
                 "Confidence intervals", "Calibration", "Failure analysis",
                 "Eligibility criteria", "Outcome definition", "Sample-size", "External validation", "Intended use"):
        assert item in html, item
    assert "scratch:resnet18" in html
    assert "stages.0.lr" in html  # nested-CV choices per outer fold
    assert json.loads((run["dir"] / "environment.json").read_text())["torch"] in html


def test_user_text_is_escaped(run):
    html, doc = run["html"], run["doc"]
    assert "<script>alert" not in html and "<b>bold" not in html
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert doc.h1 == STUDY_NAME  # shown as text, not markup


def test_report_without_evidence_still_renders(run, tmp_path):
    """An older or interrupted run (no evidence block) gives a report with the fold table only."""
    d = tmp_path / "run"
    shutil.copytree(run["dir"], d)
    m = json.loads((d / "metrics.json").read_text())
    m.pop("evidence")
    (d / "metrics.json").write_text(json.dumps(m))
    parser = ReportParser()
    parser.feed(write_report(d).read_text(encoding="utf-8"))
    assert {r["attrs"]["data-unit"] for r in parser.tables["units-table"]} == set(m["arms"])
    assert "fig-roc" not in parser.ids
