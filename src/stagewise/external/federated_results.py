"""The coordinator's side of a federated evaluation once the sites answered: their figures
side by side, the pooled figures from their summed arrays (`evaluation.binned`), written as
results.json and a short report page. Only what the sites sent is used; nothing here ever
saw a patient's score.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from stagewise.evaluation.binned import SUMS, pooled_figures
from stagewise.io import atomic_write, strict_json

SPEC_FILE = "evaluation.json"
RESULTS_FILE = "results.json"

ABOUT = ("federated evaluation of one stagewise bundle: each site scored its own labelled patients with its copy of "
         "the bundle and sent only aggregates (its figures with CIs resampling its own patients; per-class counts of "
         "patient scores in fixed bins; confusion counts at the bundle's threshold; sums of probabilities and squared "
         "errors). Pooled figures are computed from the sums of those aggregates.")
AUROC_BOUND = ("The pooled AUROC is computed from the summed per-class histograms of patient scores in {bins} fixed "
               "bins ({how}). Patient pairs in different bins are ordered exactly; only pairs within "
               "one bin are unknown, so the AUROC of the unbinned scores lies in [lower, upper] (same-bin pairs all "
               "counted against, or all for, the positive) and the point (same-bin pairs as ties) is within "
               "half_width of it.")


class EvaluationDir:
    """The coordinator's folder: evaluation.json (what is evaluated), federation/ (status,
    wire log, admitted sites), results.json and report.html."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fed = self.path / "federation"

    def write_spec(self, spec: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / SPEC_FILE, strict_json(spec))

    def spec(self) -> dict:
        return json.loads((self.path / SPEC_FILE).read_text())

    def status(self, **fields) -> None:
        self.fed.mkdir(parents=True, exist_ok=True)
        atomic_write(self.fed / "status.json", strict_json(fields | {"time": time.strftime("%Y-%m-%dT%H:%M:%S")}))

    def read_status(self) -> dict:
        path = self.fed / "status.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def results(self) -> dict:
        return json.loads((self.path / RESULTS_FILE).read_text())


def pool_sites(spec: dict, sites: dict[str, dict], failures: dict[str, str]) -> dict:
    """results.json from each answering site's {"figures", "histograms", "sums"}: per site its
    own figures and pooled-style figures from its own sums; pooled over the sites that answered."""
    edges = np.asarray(spec["edges"], dtype=float)
    bins = len(edges) - 1
    per_site, total_h, total_s = {}, np.zeros((2, bins)), np.zeros(len(SUMS))
    for name in sorted(sites):
        got = sites[name]
        h, s = np.asarray(got["histograms"], dtype=float), np.asarray(got["sums"], dtype=float)
        total_h, total_s = total_h + h, total_s + s
        per_site[name] = {"figures": got["figures"], "from_sums": pooled_figures(s, h)}
    how = f"{spec['bins']} equal-width on [0, 1]"
    if spec.get("edges_from_development_scores"):
        how += " with edges added at the quantiles of the bundle's out-of-fold development scores"
    return {
        "about": ABOUT,
        "bundle": spec.get("bundle", {}),
        "settings": {"bins": bins, "edges": edges.tolist(), "equal_width_bins": spec["bins"],
                     "edges_from_development_scores": bool(spec.get("edges_from_development_scores")), "bootstrap_resamples": spec.get("bootstrap"),
                     "seed": spec.get("seed"), "level": 0.95, "resampling": "patients, at each site",
                     "threshold": "the bundle's stored threshold, never re-chosen"},
        "auroc_bound": AUROC_BOUND.format(bins=bins, how=how),
        "sites_expected": int(spec.get("sites", len(sites))),
        "sites": per_site,
        "failed_sites": dict(sorted(failures.items())),
        "pooled": pooled_figures(total_s, total_h) | {"sites": sorted(sites)},
    }


def _num(value, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


def markdown_report(results: dict) -> str:
    """A short page of the results (markdown): per site and pooled."""
    lines = [f"# Federated evaluation of bundle {results['bundle'].get('recipe', '')} "
             f"(output {results['bundle'].get('output', '')})", "", results["about"], "",
             "| site | patients | positive | AUROC [95 % CI, DeLong] | sensitivity | specificity | "
             "mean predicted | observed | CITL intercept |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in results["sites"].items():
        f = s["figures"]
        lines.append(f"| {name} | {f['n_patients']} | {f['n_positive']} | {_num(f['auroc'])} [{_num(f['auroc_low'])}, "
                     f"{_num(f['auroc_high'])}] | {_num(f['sensitivity'])} | {_num(f['specificity'])} | "
                     f"{_num(f['mean_predicted'])} | {_num(f['observed_rate'])} | {_num(f['calibration_intercept'])} |")
    p = results["pooled"]
    a, t, c = p["auroc_binned"], p["at_threshold"], p["calibration_in_the_large"]
    lines += ["", f"**Pooled over {len(p['sites'])} sites** ({p['n_patients']} patients, {p['n_positive']} positive):",
              f"- AUROC {_num(a['point'])}, within [{_num(a['lower'], 4)}, {_num(a['upper'], 4)}] "
              f"(binning half-width {_num(a['half_width'], 4)})",
              f"- at the bundle's threshold: sensitivity {_num(t['sensitivity']['point'])} "
              f"[{_num(t['sensitivity']['low'])}, {_num(t['sensitivity']['high'])}], specificity "
              f"{_num(t['specificity']['point'])} [{_num(t['specificity']['low'])}, {_num(t['specificity']['high'])}] "
              f"(Wilson 95 % intervals; TP {t['tp']}, FP {t['fp']}, TN {t['tn']}, FN {t['fn']})",
              f"- calibration-in-the-large: mean predicted {_num(c['mean_predicted'])}, observed "
              f"{_num(c['observed_rate'])}, observed/expected {_num(c['observed_over_expected'])}; "
              f"Brier {_num(p['brier'])}", "", results["auroc_bound"]]
    if results["failed_sites"]:
        lines += ["", "Sites that did not answer: " + "; ".join(f"{k}: {v}" for k, v in results["failed_sites"].items())]
    return "\n".join(lines) + "\n"


def write_results(folder: EvaluationDir, results: dict) -> None:
    """results.json, report.md and report.html (the markdown page as HTML, through report/)."""
    from stagewise.report.html import write_markdown_page

    text = markdown_report(results)
    atomic_write(folder.path / RESULTS_FILE, strict_json(results))
    atomic_write(folder.path / "report.md", text)
    write_markdown_page(folder.path / "report.html", "Federated evaluation", text)


__all__ = ["EvaluationDir", "markdown_report", "pool_sites", "write_results"]
