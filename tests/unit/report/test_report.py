"""The HTML report: one self-contained file whose numbers are metrics.json's, with user text escaped."""

import base64
import importlib.resources
import html
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import pytest

from conftest import small_recipe
from stagewise.report.formatting import fmt_mean_sd, fmt_num, fmt_p, fmt_point_ci
from stagewise.report.html import TEMPLATE_NAME, environment, write_report
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


def test_clinical_metrics_table_shows_metrics_json_values(run):
    """Sensitivity ... AUPRC as fold mean ± sd over pooled point [CI], and the pooled counts."""
    m = run["metrics"]
    rows = {r["attrs"]["data-unit"]: r["cells"] for r in run["doc"].tables["clinical-table"]}
    assert set(rows) == set(m["arms"])
    for name, arm in m["arms"].items():
        ev = m["evidence"]["units"][name]
        for metric in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "auprc"):
            s, b = arm["summary"][metric], ev["bootstrap_ci"][metric]
            assert rows[name][metric] == fmt_mean_sd(s) + fmt_point_ci(b), (name, metric)
        counts = ev["confusion"]
        assert [int(rows[name][c]) for c in ("tp", "fp", "tn", "fn")] == [counts[c] for c in ("tp", "fp", "tn", "fn")]
        assert counts["tp"] + counts["fn"] == ev["n_positive"] and sum(counts.values()) == ev["n_patients"]


def test_comparison_numbers_and_p_values(run):
    rows = {(r["attrs"]["data-a"], r["attrs"]["data-b"]): r["cells"] for r in run["doc"].tables["comparisons-table"]
            if "data-a" in r["attrs"]}
    for c in run["metrics"]["evidence"]["comparisons"]:
        cells = rows[(c["a"], c["b"])]
        assert cells["delong_diff"] == f"{c['delong']['diff']:.3f}".replace("-", "\u2212")
        assert cells["delong_p"] == ("< 0.001" if c["delong"]["p"] < 0.001 else f"{c['delong']['p']:.3f}")
        assert cells["t_p"] == fmt_p(c["corrected_t"]["p"])
        assert cells["t_holm"] == ("" if c["primary"] else fmt_p(c["corrected_t"]["p_holm"]))
        # 3 folds: the signed-rank test cannot reach 0.05 (smallest p 0.25), so it is not shown
        assert not c["wilcoxon_can_reach"] and cells["w_p"] == "\u2014"
    primary = run["metrics"]["evidence"]["primary"]
    assert f"Primary comparison: {primary['a']} vs {primary['b']}" in run["html"]
    assert "the smallest p this test can give is 0.250" in run["html"]


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
    assert all(img["alt"].startswith("Grad-CAM map") for img in saliency)
    assert "saliency-colorbar" in by_id
    # captions and alt texts name the fold and its threshold, never an image file
    for arm in run["metrics"]["arms"].values():
        for item in arm.get("saliency", []):
            assert Path(item["file"]).name not in run["html"]
    folds = {f"r{f['repeat']}-f{f['fold']}": f["threshold"] for f in run["metrics"]["arms"]["probe"]["folds"]}
    for split, threshold in folds.items():
        if f"fold {split}" in run["html"]:
            assert f"fold threshold {fmt_num(threshold)}" in run["html"]


def test_training_curves_per_unit_are_the_logged_losses(run):
    curves = run["metrics"]["arms"]["probe"]["training_curves"]
    assert len(curves) == run["metrics"]["n_splits"]
    fold = json.loads((run["dir"] / "folds" / "probe" / "r0-f0.json").read_text())
    assert curves[0]["stages"][0]["loss"] == [e["loss"] for e in fold["stages"][0]["epochs"]]
    shown = [img for img in run["doc"].images if img.get("class") == "training-curve"]
    assert {img["data-unit"] for img in shown} == {n for n, a in run["metrics"]["arms"].items() if a.get("training_curves")}
    assert "training-curves" in run["doc"].ids


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


def test_template_is_package_data():
    """The page comes from templates/report.html.j2 inside the package (pyproject's package-data), not a string."""
    env = environment()
    assert isinstance(env.loader, jinja2.PackageLoader)
    template = env.get_template(TEMPLATE_NAME)
    shipped = importlib.resources.files("stagewise.report") / "templates" / TEMPLATE_NAME
    assert shipped.is_file()
    assert Path(template.filename).resolve() == Path(str(shipped)).resolve()
    assert shipped.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert env.autoescape is True and env.undefined is jinja2.StrictUndefined


def _fixed_run(d: Path) -> Path:
    """A hand-written finished run that reaches every section: sites, tasks, resources, tuning, saliency."""
    d.mkdir(parents=True)
    roc = {"fpr": [0.0, 0.1, 0.3, 1.0], "tpr": [0.0, 0.6, 0.9, 1.0],
           "tpr_low": [0.0, 0.4, 0.8, 1.0], "tpr_high": [0.0, 0.8, 1.0, 1.0]}
    cal = {"prob_pred": [0.1, 0.4, 0.8], "prob_true": [0.15, 0.35, 0.9]}
    dec = {"threshold": [0.1, 0.3, 0.5], "net_benefit_model": [0.4, 0.3, 0.2],
           "net_benefit_all": [0.38, 0.2, -0.1], "net_benefit_none": [0.0, 0.0, 0.0]}

    def stat(m, s, n=3):
        return {"mean": m, "sd": s, "n": n}

    def ci(p, lo, hi):
        return {"point": p, "low": lo, "high": hi}

    folds = [{"repeat": 0, "fold": i, "auroc": 0.8 + 0.05 * i, "n_test_patients": 10 + i, "n_train_patients": 20 - i}
             for i in range(3)]

    def arm(kind, **kw):
        return {"kind": kind, "backbone": "scratch:resnet18" if kind == "model" else "\u2014",
                "stages": ["probe"] if kind == "model" else [], "folds": folds,
                "summary": {"auroc": stat(0.85, 0.04), "balanced_accuracy": stat(0.7712, 0.031, 2),
                            "f1": stat(-0.00001, float("nan"))}, "train_seconds": 12.34, **kw}

    def unit_evidence(name):
        e = {"n_patients": 40, "n_positive": 15, "roc": roc, "auroc_delong_ci": ci(0.86, 0.75, 0.95),
             "bootstrap_ci": {"auroc": ci(0.861, 0.74, 0.96), "balanced_accuracy": ci(0.77, 0.65, 0.88),
                              "f1": ci(0.7, 0.55, 0.83)}}
        if not name.startswith("baseline"):
            e.update(calibration_curve=cal, decision_curve=dec,
                     calibration={"slope": 0.91, "slope_low": 0.5, "slope_high": 1.3, "intercept": -0.12,
                                  "intercept_low": -0.6, "intercept_high": 0.4, "brier": 0.17})
        if name == "probe":
            e["tasks"] = {"death": {"bootstrap_ci": {"auroc": ci(0.7, 0.6, 0.8)}}}
        return e

    metrics = {
        "recipe": "golden <study> & co", "seed": 7, "compute": "cpu fp32", "n_splits": 3,
        "wall_seconds_this_session": 99.6,
        "cohort": {"patients": 40, "positive_patients": 15, "negative_patients": 25, "images": 80,
                   "positive_images": 31, "negative_images": 49,
                   "sites": {"A": {"patients": 20, "positive_patients": 5, "images": 40}, "B": {"patients": 20}}},
        "protocol": {"kind": "leave_one_site_out", "test_images": "all", "patient_aggregate": "mean", "threshold": 0.5},
        "arms": {
            "baseline:grade": arm("baseline"),
            "probe@0.5": arm("model", label_fraction=0.5, base_arm="probe"),
            "clinical": arm("clinical"),
            "probe": arm("model", label_fraction=1.0, base_arm="probe",
                         tasks={"death": {"auroc": stat(0.7, 0.1), "f1": stat(0.5, 0.2)}},
                         resources={"probe:0": {"median_seconds_per_fold": 3.21, "peak_rss_bytes": 3 * 2**30,
                                                "saved_activation_peak_bytes": 5 * 2**20}},
                         tuning=[{"repeat": 0, "fold": i, "chosen": {"stages.0.lr": 0.001 * (i + 1)}}
                                 for i in range(3)],
                         saliency=[{"file": "folds/r0-f1/saliency/probe-3.png", "row": 3, "y": 1, "prob": 0.91,
                                    "correct": True},
                                   {"file": "folds/r0-f2/saliency/missing.png", "row": 5, "y": 0, "prob": 0.77,
                                    "correct": False}]),
        },
        "evidence": {
            "patient_level": "mean of each patient's image scores",
            "units": {n: unit_evidence(n) for n in ("probe", "probe@0.5", "clinical", "baseline:grade")},
            "comparisons": [
                {"a": "probe", "b": "clinical", "n_patients": 40,
                 "delong": {"diff": -0.0721, "ci_low": -0.2, "ci_high": 0.05, "p": 0.0004},
                 "corrected_t": {"mean_diff": 0.03, "ci_low": -0.1, "ci_high": 0.16, "p": 0.3, "df": 2},
                 "wilcoxon": {"p": 0.04}},
                {"a": "probe", "b": "baseline:grade", "n_patients": 40,
                 "delong": {"diff": 0.1, "ci_low": 0.01, "ci_high": 0.2, "p": 0.049},
                 "corrected_t": {"mean_diff": 0.1, "ci_low": 0.0, "ci_high": 0.2, "p": 0.051, "df": 2}},
            ],
            "label_efficiency": {"probe": [{"fraction": 0.5, "auroc_mean": 0.8, "auroc_sd": 0.05},
                                           {"fraction": 1.0, "auroc_mean": 0.85, "auroc_sd": float("nan")}]},
        },
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "environment.json").write_text(json.dumps({"stagewise": "9.9", "python": "3.11", "torch": "2.0", "cuda": None,
                                                    "cpu_threads": 2, "ok": True, "lr": 0.0001}))
    (d / "recipe.yaml").write_text(
        "name: golden\ncohort: {outcome: died, clinical: [age]}\ndata: {image_size: 32, resize: pad}\n"
        "evaluation: {bootstrap: 200}\narms:\n- name: probe\n  backbone: {name: scratch:resnet18, weights: w.pt}\n"
        "  head: {dropout: 0.1, hidden: null}\n  tune: {grid: {stages.0.lr: [0.001, 0.003]}, inner_folds: 2}\n"
        "  stages:\n  - {kind: probe, epochs: 2, batch_size: 16, lr: 0.003, lr_decay: 0.5, schedule: onecycle,\n"
        "     weight_decay: 0.0001, bn: freeze, unfreeze: {0.5: 1}, balanced_sampling: true,\n"
        "     augment: {flip: true, rotate: 10.0, scale: 0.0}, cutmix: {alpha: 1.0, p: 0.5}, mixup: null}\n")
    (d / "log.txt").write_text("2030-01-02 03:04:05,678 INFO start\n")
    sal = d / "folds/r0-f1/saliency/probe-3.png"
    sal.parent.mkdir(parents=True)
    sal.write_bytes(b"\x89PNG\r\n\x1a\nnot really an image")
    return d




def _without_time(html: str) -> str:
    """The page less the minute it was written (the footer's `on YYYY-MM-DD HH:MM from`)."""
    return re.sub(r" on \d{4}-\d\d-\d\d \d\d:\d\d from ", " on DATE from ", html)


def _normalized(html: str, run_dir: Path) -> str:
    html = _without_time(html.replace(str(run_dir.resolve()), "RUN_DIR"))
    return re.sub(r'(id="fig-[a-z-]+" alt="[^"]*" src="data:image/png;base64,)[^"]+"', r'\1PNG"', html)


def test_fixed_run_renders_every_section_repeatably_and_without_local_paths(tmp_path):
    d = _fixed_run(tmp_path / "run")
    first = write_report(d).read_text(encoding="utf-8")
    assert str(tmp_path) not in first  # a report leaves the site: no local path in it
    page = _normalized(first, d)
    assert page.count('base64,PNG"') == 4  # ROC, calibration, decision and label-efficiency figures
    for section in ("summary", "comparisons", "discrimination", "calibration", "label-efficiency", "tuning",
                    "checklist", "recipe"):
        assert f'<section id="{section}">' in page, section
    again = write_report(d).read_text(encoding="utf-8")
    assert _without_time(again) == _without_time(first)  # figures included: same curves, same PNG bytes


def test_missing_data_item_is_filled_from_the_run(run, digits_manifest):
    """age is missing in every 7th row of the fixture's cohort: counted per column, imputation stated."""
    table = pd.read_csv(digits_manifest.with_name("report_cohort.csv"))
    missing = run["metrics"]["cohort"]["missing"]
    assert missing["age"] == {"rows": int(table["age"].isna().sum()), "of_rows": len(table),
                              "patients": int(table.loc[table["age"].isna(), "patient"].nunique())}
    assert missing["age"]["rows"] > 0 and missing["grade"]["rows"] == 0
    text = run["html"]
    assert (f"age: missing in {missing['age']['rows']} of {missing['age']['of_rows']} rows "
            f"({missing['age']['patients']} patients); median-imputed inside each fold") in text
    assert "grade: missing in 0 of" in text and "Missing data: why" in text


def test_cross_site_evaluation_in_the_federated_section(tmp_path):
    """A federated arm run with `sites.cross_site_evaluation`: its matrix (a row per site model,
    bold own-site cells), the study's local arm's matrix in the same shape, per site the global,
    personalised and local AUROCs with their bootstrap CIs, and the sentence that the site
    models left their sites; all values of metrics.json."""
    d = _fixed_run(tmp_path / "run")
    metrics = json.loads((d / "metrics.json").read_text())
    base = metrics["arms"]["probe"]
    site_ci = {s: {"auroc_bootstrap_ci": {"point": p, "low": p - 0.1, "high": min(1.0, p + 0.1)}}
               for s, p in (("A", 0.81), ("B", 0.72))}
    metrics["arms"]["fed"] = {**base, "base_arm": "fed", "training": "federated", "sites_training": {
        "mode": "federated", "strategy": "fedavg", "bn_stats": "average", "rounds": [], "round_loss": [],
        "cross_site": {"auroc": {"A": {"A": 0.811, "B": 0.642}, "B": {"A": 0.553, "B": 0.724}},
                       "global_auroc": {"A": 0.7, "B": 0.6}, "site_models_left_sites": True, "folds": 3,
                       "site_model_bytes": {"A": 2052, "B": 2052}, "bytes_down_per_fold": 4104.0}}}
    metrics["arms"]["local"] = {**base, "base_arm": "local", "training": "local", "sites_training": {
        "mode": "local", "cross_site_auroc": {"A": {"A": 0.9, "B": 0.5}, "B": {"A": 0.4, "B": 0.8}}}}
    units = metrics["evidence"]["units"]
    units["fed"] = {**units["probe"], "sites": site_ci,
                    "sites_global_model": {s: {"auroc_bootstrap_ci": {"point": 0.61, "low": 0.5, "high": 0.7}}
                                           for s in "AB"}}
    units["local"] = {**units["probe"], "sites": {s: {"auroc_bootstrap_ci": {"point": 0.66, "low": 0.55, "high": 0.77}}
                                                  for s in "AB"}}
    (d / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(d).read_text(encoding="utf-8")
    fed = page[page.index('<div class="cross-site" data-unit="fed">'):]
    fed = html.unescape(fed[:fed.index("</div>")])
    assert "each site's own model left its site (sites.cross_site_evaluation)" in fed and "2.1 kB per site" in fed
    assert 'data-unit="fed" data-kind="federated"' in fed and 'data-unit="local" data-kind="local"' in fed
    assert "<b>0.811</b>" in fed and "<b>0.724</b>" in fed and ">0.642<" in fed and ">0.553<" in fed
    assert "<b>0.900</b>" in fed and ">0.400<" in fed  # the local arm's matrix, same shape
    assert "0.810 [0.710, 0.910]" in fed and "0.610 [0.500, 0.700]" in fed and "0.660 [0.550, 0.770]" in fed
    assert page.count('data-unit="local" data-kind="local"') == 2  # also under Sites, as every local arm's
