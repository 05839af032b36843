"""The report's Participants and Subgroups sections, the figures' bands, and the TRIPOD+AI items
that state them: each listed as done only when metrics.json holds what it claims."""

import json
import re

from stagewise.report.context import build_context
from stagewise.report.figures import calibration_figure, decision_figure
from stagewise.report.html import write_report

CAL = {"prob_pred": [0.1, 0.4, 0.8], "prob_true": [0.15, 0.35, 0.9]}
SMOOTH = {"prob": [0.1, 0.45, 0.8], "observed": [0.12, 0.4, None], "low": [0.05, 0.3, None], "high": [0.2, 0.5, None]}
DEC = {"threshold": [0.1, 0.3, 0.5], "net_benefit_model": [0.4, 0.3, 0.2], "net_benefit_all": [0.38, 0.2, -0.1],
       "net_benefit_none": [0.0, 0.0, 0.0]}
BANDS = {"net_benefit_model_low": [0.35, 0.2, 0.1], "net_benefit_model_high": [0.45, 0.4, 0.3], "band_resamples": 200}


def _run(d, tripod: bool):
    d.mkdir(parents=True)
    stat = {"mean": 0.8, "sd": 0.05, "n": 3}
    folds = [{"repeat": 0, "fold": i, "auroc": 0.8, "threshold": 0.5} for i in range(3)]
    cohort = {"patients": 40, "positive_patients": 15, "negative_patients": 25, "images": 80, "positive_images": 30,
              "negative_images": 50}
    ev = {"n_patients": 40, "n_positive": 15, "calibration_curve": dict(CAL), "decision_curve": dict(DEC),
          "calibration": {"slope": 1.0, "brier": 0.2}}
    evidence = {"units": {"probe": ev, "baseline:grade": {"n_patients": 37, "n_positive": 14}}}
    if tripod:
        cohort["flow"] = {"rows_read": 83, "dropped_missing_outcome": 3, "images": 80, "patients": 40}
        cohort["characteristics"] = {
            "subgroups": {"sex": {"levels": ["F", "M"], "per_image": False, "bands": None}},
            "groups": [{"by": by, "level": lv, "patients": n, "images": 2 * n, "positive_patients": k,
                        "prevalence_patients": k / n, "levels": {"sex": {"F": {"patients": n - 5, "images": 2 * n - 10},
                                                                         "M": {"patients": 5, "images": 10}}}}
                       for by, lv, n, k in (("all", "all", 40, 15), ("outcome", "positive", 15, 15),
                                            ("outcome", "negative", 25, 0))]}
        ev["calibration_curve"]["smooth"] = SMOOTH
        ev["decision_curve"].update(BANDS)
        evidence["subgroups"] = {
            "min_class": 10, "resamples": 200, "columns": cohort["characteristics"]["subgroups"],
            "units": {"probe": {"sex": {"F": {"n_patients": 35, "n_positive": 12, "n_negative": 23, "n_images": 70,
                                              "estimable": True, "auroc": {"point": 0.812, "low": 0.7, "high": 0.9}},
                                        "M": {"n_patients": 5, "n_positive": 3, "n_negative": 2, "n_images": 10,
                                              "estimable": False}}}}}
    arm = {"kind": "model", "backbone": "scratch:resnet18", "stages": ["probe"], "folds": folds, "label_fraction": 1.0,
           "base_arm": "probe", "summary": {"auroc": stat}}
    metrics = {"recipe": "t", "seed": 0, "n_splits": 3, "cohort": cohort,
               "protocol": {"kind": "group_kfold", "folds": 3, "repeats": 1, "test_images": "all",
                            "patient_aggregate": "mean", "threshold": "youden"},
               "arms": {"probe": arm, "baseline:grade": {"kind": "baseline", "folds": folds, "summary": {"auroc": stat}}},
               "evidence": evidence}
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "environment.json").write_text(json.dumps({"stagewise": "9.9"}))
    (d / "recipe.yaml").write_text("name: t\ncohort: {outcome: died}\narms:\n- name: probe\n  stages: [{kind: probe}]\n")
    return d


def _items(ctx) -> dict:
    return {c["topic"]: c["lines"] for c in ctx["checklist_auto"]}


def test_participants_and_subgroups_sections_show_the_runs_counts(tmp_path):
    d = _run(tmp_path / "run", tripod=True)
    html = write_report(d).read_text(encoding="utf-8")
    for section in ("participants", "subgroups"):
        assert f'<section id="{section}">' in html and f'href="#{section}"' in html
    flow = dict(re.findall(r'<tr data-step="([^"]+)"><td[^>]*>[^<]+</td><td class="num em">(\d+)</td>', html))
    assert flow == {"manifest rows read": "83", "left out: empty outcome": "3",
                    "images analysed": "80", "patients analysed": "40",
                    "baseline:grade: patients with an out-of-fold score": "37"}
    assert "outcome positive" in html and "35 (88 %)" in html  # 35 of 40 patients are F
    row_f = re.search(r'data-column="sex" data-level="F">(.*?)</tr>', html).group(1)
    assert "0.812 [0.700, 0.900]" in row_f and ">35<" in row_f and ">12<" in row_f
    row_m = re.search(r'data-column="sex" data-level="M">(.*?)</tr>', html).group(1)
    assert "too few to estimate" in row_m and "0." not in row_m


def test_checklist_states_each_tripod_item_only_when_computed(tmp_path):
    done = _items(build_context(_run(tmp_path / "new", tripod=True)))
    assert done["Participants: flow and characteristics"][0] == (
        "83 manifest rows read; 3 left out for an empty outcome; 80 images of 40 patients analysed")
    assert "distribution of sex" in done["Participants: flow and characteristics"][1]
    assert done["Subgroups and fairness"][0] == "AUROC per level of sex for probe, with patient-bootstrap 95 % CIs (200 resamples)"
    calibration = done["Calibration and clinical utility"]
    assert "smoothed calibration curve (LOWESS) with a 95 % patient-bootstrap band" in calibration
    assert "decision curves with 95 % patient-bootstrap bands of the net benefit" in calibration

    old = build_context(_run(tmp_path / "old", tripod=False))  # a run made before these existed
    items = _items(old)
    assert "Participants: flow and characteristics" not in items and "Subgroups and fairness" not in items
    assert not any("LOWESS" in line or "bands" in line for line in items["Calibration and clinical utility"])
    assert "Subgroups and fairness" in [c["topic"] for c in old["checklist_user"]]
    assert old["participants"]["flow"] == [] and old["subgroups"] is None


def test_figures_draw_the_smooth_and_the_bands_where_present():
    ev = {"a": {"calibration_curve": CAL | {"smooth": SMOOTH}, "decision_curve": DEC | BANDS}}
    plain = {"a": {"calibration_curve": CAL, "decision_curve": DEC}}
    colors = {"a": "#1f77b4"}
    assert calibration_figure(["a"], ev, colors) != calibration_figure(["a"], plain, colors)
    assert decision_figure(["a"], ev, colors) != decision_figure(["a"], plain, colors)


def test_external_checklist_states_subgroups_baselines_and_bands_only_when_computed():
    from stagewise.report.tripod_items import external_items

    ext = {"calibration_curve": CAL | {"smooth": SMOOTH}, "decision_curve": DEC | BANDS,
           "subgroups": {"min_class": 10, "resamples": 50, "columns": {"view": {"levels": ["AP"]}},
                         "units": {"external": {"view": {"AP": {"estimable": False}}}}},
           "baselines": {"grade": {"n_patients": 30}}}
    cohort = {"flow": {"rows_read": 10, "dropped_missing_outcome": 1, "images": 9, "patients": 5}}
    done, todo = external_items({"external": ext, "cohort": cohort})
    items = {i["topic"]: i["lines"] for i in done}
    assert items["Participants: flow and characteristics"] == [
        "10 manifest rows read; 1 left out for an empty outcome; 9 images of 5 patients analysed"]
    assert items["Subgroups and fairness"][0] == "AUROC per level of view for external, with patient-bootstrap 95 % CIs (50 resamples)"
    assert "grade" in items["Comparators"][0]
    assert items["Uncertainty of the curves"] == ["smoothed calibration curve (LOWESS) with a 95 % patient-bootstrap band",
                                                  "decision curves with 95 % patient-bootstrap bands of the net benefit"]
    assert todo == []
    done, todo = external_items({"external": {"calibration_curve": CAL, "decision_curve": DEC}, "cohort": {}})
    assert done == [] and [t["topic"] for t in todo] == ["Subgroups and fairness"] and "--subgroup" in todo[0]["hint"]
