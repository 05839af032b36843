"""A federated evaluation of one bundle (`stagewise federation evaluate`): each site scores its
own manifest and sends aggregates only; the coordinator pools them.

- the AUROC from per-class histograms brackets the AUROC of the unbinned scores (the bound
  the results state), and its point is the AUROC of the binned scores;
- pooled over sites it brackets scikit-learn's AUROC on the pooled patient scores, with a
  bound narrow enough to be useful at the default bins; pooled counts are the sums;
- a site's manifest problems are reported by CSV line before it connects;
- in a real Flower run no message carries a patient id, a file name, a path or a patient's
  score, and a site that fails is recorded without its text (which names its files).
"""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import small_recipe
from stagewise.bundle import Bundle, export_bundle
from stagewise.data import CohortError
from stagewise.evaluation.binned import DEFAULT_BINS, binned_auroc, class_histograms, pooled_figures, score_edges
from stagewise.external import EvaluateError, ExternalOptions
from stagewise.external.federated_app import simulate_evaluation
from stagewise.external.federated_evaluation import plan_evaluation
from stagewise.external.federated_results import pool_sites
from stagewise.external.manifest import load_external, patient_table, score_cohort
from stagewise.external.site_summary import EvaluationSite, prepare_site, summarize_site
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 2, "batch_size": 16, "lr": 3e-2}


@pytest.mark.parametrize("seed", range(5))
def test_binned_auroc_brackets_the_auroc_of_unbinned_scores(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.clip(rng.normal(0.45 + 0.1 * y, 0.05 + 0.1 * seed), 0, 1)
    s[:5] = [0.0, 1.0, 0.5, 0.25, 0.25]  # the edges themselves
    for edges in (score_edges(10), score_edges(DEFAULT_BINS), score_edges(20, rng.uniform(0.3, 0.6, 50))):
        got = binned_auroc(class_histograms(y, s, edges))
        exact = roc_auc_score(y, s)
        assert got["lower"] - 1e-12 <= exact <= got["upper"] + 1e-12
        assert abs(got["point"] - exact) <= got["half_width"] + 1e-12
        bin_of = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, len(edges) - 2)
        assert got["point"] == pytest.approx(roc_auc_score(y, bin_of))  # same-bin pairs as ties
    assert binned_auroc(class_histograms(np.zeros(4), s[:4], score_edges(10)))["point"] is None


@pytest.fixture(scope="module")
def hospitals(digits_manifest, tmp_path_factory):
    """A bundle of the digits cohort and that cohort split by patient over three sites."""
    root = tmp_path_factory.mktemp("fedeval")
    recipe = small_recipe(digits_manifest, [{"name": "net", "backbone": "scratch:tinycnn", "stages": [PROBE]}],
                          protocol={"folds": 2}, compute={"save_models": True},
                          evaluation={"saliency": 0, "bootstrap": 0, "report": False})
    run_study(recipe, root / "run")
    bundle = export_bundle(root / "run", "net", root / "bundle", fold="r0-f0")
    table = pd.read_csv(digits_manifest)
    table["path"] = [str(digits_manifest.parent / p) for p in table["path"]]
    patients = table["patient"].unique()
    manifests = {}
    for i, site in enumerate("ABC"):
        manifests[site] = root / f"hospital-{site}.csv"
        table[table["patient"].isin(patients[i::3])].to_csv(manifests[site], index=False)
    return root, bundle, manifests, table


def _pooled_patient_scores(bundle_dir, manifests):
    """What a central evaluation of the pooled manifests computes: one score per patient."""
    bundle, ys, ss = Bundle.load(bundle_dir), [], []
    outcome = bundle.info["tasks"][0]["outcome"]
    for manifest in manifests:
        cohort = load_external(manifest, ExternalOptions(), {}, outcome)
        table, _ = patient_table(cohort, score_cohort(bundle, cohort)[:, 0], "all", "mean")
        ys.append(table["y"].to_numpy())
        ss.append(table["score"].to_numpy())
    return np.concatenate(ys), np.concatenate(ss)


def test_pooled_figures_from_site_sums_equal_the_pooled_predictions_within_the_bound(hospitals, tmp_path):
    root, bundle, manifests, _ = hospitals
    folder = plan_evaluation(bundle, tmp_path / "coordinator", sites=3, bootstrap=50)
    edges = folder.spec()["edges"]
    sites = {}
    for name, manifest in manifests.items():
        arrays, figures = summarize_site(EvaluationSite.load(prepare_site(bundle, manifest, name, tmp_path / name)),
                                         edges, 50, 0)
        sites[name] = {"figures": figures, **arrays}
    results = pool_sites(folder.spec(), sites, {})
    y, s = _pooled_patient_scores(bundle, manifests.values())
    pooled = results["pooled"]
    auc = pooled["auroc_binned"]
    assert auc["lower"] <= roc_auc_score(y, s) <= auc["upper"]
    assert auc["half_width"] < 0.02  # useful at the default bins (edges also at the development quantiles)
    threshold = Bundle.load(bundle).info["tasks"][0]["threshold"]
    t = pooled["at_threshold"]
    assert (t["tp"], t["fn"]) == (int(((s >= threshold) & (y == 1)).sum()), int(((s < threshold) & (y == 1)).sum()))
    assert t["sensitivity"]["point"] == pytest.approx(((s >= threshold) & (y == 1)).sum() / y.sum())
    assert pooled["calibration_in_the_large"]["mean_predicted"] == pytest.approx(s.mean())
    assert pooled["brier"] == pytest.approx(np.mean((s - y) ** 2))
    assert pooled["n_patients"] == len(y) == sum(f["figures"]["n_patients"] for f in sites.values())
    # each site's own AUROC is its patients' (computed at the site)
    ya, sa = _pooled_patient_scores(bundle, [manifests["A"]])
    assert sites["A"]["figures"]["auroc"] == pytest.approx(roc_auc_score(ya, sa))
    assert results["auroc_bound"].startswith("The pooled AUROC is computed from the summed per-class histograms")
    # a site holding another bundle than the coordinator's refuses
    with pytest.raises(EvaluateError, match="copy the coordinator's bundle folder"):
        summarize_site(EvaluationSite.load(tmp_path / "A" / "evaluation-site.json"), edges, 0, 0, expected_digest="0" * 64)


def test_a_site_manifest_problem_is_reported_by_csv_line_before_it_connects(hospitals, tmp_path):
    root, bundle, manifests, _ = hospitals
    bad = pd.read_csv(manifests["A"])
    bad["outcome"] = bad["outcome"].astype(str)
    bad.loc[2, "outcome"] = "maybe"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CohortError, match=r"row 4: ") as err:
        prepare_site(bundle, tmp_path / "bad.csv", "A", tmp_path / "site")
    assert "maybe" in str(err.value) and "line numbers in the CSV" in str(err.value)
    assert not (tmp_path / "site" / "evaluation-site.json").exists()


def _message_text(message) -> tuple[str, list[float]]:
    """Every string and number a message carries (arrays whole)."""
    if message.has_error():
        return str(message.error.reason), []
    texts, numbers = [], []
    for name, record in message.content.items():
        texts.append(name)
        if hasattr(record, "count_bytes") and hasattr(record, "to_numpy_ndarrays"):
            texts += list(record.keys())
            numbers += [float(v) for a in record.to_numpy_ndarrays() for v in np.ravel(a)]
            continue
        for key, value in record.items():
            texts.append(key)
            values = value if isinstance(value, list) else [value]
            texts += [str(v) for v in values if isinstance(v, str)]
            numbers += [float(v) for v in values if isinstance(v, (int, float))]
    return " ".join(texts), numbers


@pytest.mark.slow
@pytest.mark.flower
def test_a_flower_run_sends_aggregates_only_and_records_a_failed_site_without_its_text(hospitals, tmp_path):
    root, bundle, manifests, table = hospitals
    files = [prepare_site(bundle, manifests[s], s, tmp_path / f"site-{s}") for s in "ABC"]
    broken = pd.read_csv(manifests["C"])
    broken.loc[0, "path"] = str(tmp_path / "gone.png")  # C's manifest changes after it was checked
    broken.to_csv(tmp_path / "c.csv", index=False)
    site_c = EvaluationSite.load(files[2])
    site_c.manifest = tmp_path / "c.csv"
    site_c.save(files[2])
    plan_evaluation(bundle, tmp_path / "coordinator", sites=3, bootstrap=50, connect_timeout=300)
    seen = []
    results = simulate_evaluation(tmp_path / "coordinator", files, on_message=lambda d, m: seen.append((d, m)))

    assert sorted(results["pooled"]["sites"]) == ["A", "B"]
    assert list(results["failed_sites"]) == ["C"]
    failure = results["failed_sites"]["C"]
    assert "could not evaluate the bundle" in failure and "c.csv" not in failure and str(tmp_path) not in failure
    assert [d for d, _ in seen].count("up") == 3
    y, s = _pooled_patient_scores(bundle, [manifests["A"], manifests["B"]])
    assert results["pooled"]["auroc_binned"]["lower"] <= roc_auc_score(y, s) <= results["pooled"]["auroc_binned"]["upper"]

    scores = {round(float(v), 9) for v in s}
    forbidden = [str(tmp_path), str(root), *table["patient"].astype(str).unique(),
                 *[p.split("/")[-1] for p in table["path"]], "hospital-", ".csv", ".png"]
    for _, message in seen:
        text, numbers = _message_text(message)
        assert not [f for f in forbidden if f in text], text
        assert not scores & {round(v, 9) for v in numbers}  # no patient's score, whatever its key
    shared = "".join((tmp_path / "coordinator" / f).read_text() for f in ("results.json", "report.md", "report.html",
                                                                          "federation/wire.jsonl"))
    assert not [f for f in forbidden if f in shared]
    assert "Pooled over 2 sites" in (tmp_path / "coordinator" / "report.md").read_text()
    assert json.loads((tmp_path / "coordinator" / "results.json").read_text())["sites"]["A"]["figures"]["n_patients"] > 0


def test_the_coordinator_command_names_what_it_needs(tmp_path):
    from typer.testing import CliRunner

    from stagewise.cli import app

    res = CliRunner().invoke(app, ["federation", "evaluate", str(tmp_path)])
    assert res.exit_code == 2 and "give --certs and a --site-key per hospital" in res.output
    res = CliRunner().invoke(app, ["federation", "evaluate", str(tmp_path), "--simulate", "a.csv"])
    assert res.exit_code == 2 and "SITE=MANIFEST" in res.output
