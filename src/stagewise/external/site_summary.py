"""One hospital's side of a federated evaluation of a bundle: its labelled manifest scored
locally with its own copy of the bundle, and only aggregates prepared to leave.

The manifest is read and checked as `stagewise evaluate` reads one (`manifest.load_external`:
every problem at once, by CSV line), first when the site is prepared (`prepare_site`) so a
hospital sees its problems before it connects, then again when the coordinator asks. What the
site sends (`summarize_site`): its name; scalar figures computed here, with CIs that resample
its own patients (AUROC with DeLong and patient-bootstrap intervals, sensitivity,
specificity, PPV, NPV at the bundle's threshold with bootstrap intervals,
calibration-in-the-large and slope, Brier score, counts); and summable arrays: per-class
histograms of its patients' scores in fixed bins and the sums of `evaluation.binned.SUMS`.
No patient id, score, file name or path is among them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stagewise.bundle import Bundle
from stagewise.evaluation.binned import class_histograms, site_sums
from stagewise.evaluation.calibration import calibration_slope_intercept
from stagewise.evaluation.evidence import auroc_cis
from stagewise.evaluation.statistics import bootstrap_metrics
from stagewise.external.manifest import bundle_recipe, load_external, patient_table, score_cohort
from stagewise.external.options import EvaluateError, ExternalOptions
from stagewise.federated.job import SITE_NAME
from stagewise.io import atomic_write

SITE_FILE = "evaluation-site.json"
RATES = ("sensitivity", "specificity", "ppv", "npv")


def bundle_digest(info: dict) -> str:
    """SHA-256 of bundle.json whole (its file digests included): every site must hold the same bundle."""
    return hashlib.sha256(json.dumps(info, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class EvaluationSite:
    """A hospital's settings for a federated evaluation (its site file; it never leaves the site)."""

    site: str
    bundle: Path
    manifest: Path
    options: ExternalOptions = field(default_factory=ExternalOptions)

    def save(self, path: Path) -> Path:
        data = {"site": self.site, "bundle": str(self.bundle), "manifest": str(self.manifest),
                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self.options).items()}}
        atomic_write(path, json.dumps(data, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EvaluationSite":
        data = json.loads(Path(path).read_text())
        options = dict(data["options"])
        options["root"] = Path(options["root"]) if options.get("root") else None
        return cls(data["site"], Path(data["bundle"]), Path(data["manifest"]), ExternalOptions(**options))

    def task(self, bundle: Bundle) -> tuple[int, dict]:
        outputs = [t["output"] for t in bundle.info["tasks"]]
        j = outputs.index(self.options.output) if self.options.output else 0
        return j, bundle.info["tasks"][j]

    def cohort(self, bundle: Bundle):
        """The checked cohort (CohortError: every problem, by CSV line)."""
        _, task = self.task(bundle)
        return load_external(self.manifest, self.options, bundle_recipe(self.bundle), task["outcome"])


def prepare_site(bundle: str | Path, manifest: str | Path, site: str, workdir: str | Path,
                 options: ExternalOptions | None = None) -> Path:
    """Check the bundle, the options and every row and image of this hospital's manifest;
    write its site file into `workdir`; returns its path."""
    if not SITE_NAME.match(site):
        raise EvaluateError([f"site name {site!r}: use letters, digits, '_', '.', '-' (at most 64), no patient data"],
                            "stagewise federation evaluate")
    options = options or ExternalOptions()
    config = EvaluationSite(site, Path(bundle).resolve(), Path(manifest).resolve(), options)
    loaded = Bundle.load(config.bundle)
    problems = options.problems([t["output"] for t in loaded.info["tasks"]])
    if options.recalibrate:
        problems.append("--recalibrate: a federated evaluation does not refit the bundle; evaluate it at one site "
                        "with `stagewise evaluate` to recalibrate")
    if problems:
        raise EvaluateError(problems, "stagewise federation evaluate")
    config.cohort(loaded)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return config.save(workdir / SITE_FILE)


def _flat(prefix: str, ci: dict | None) -> dict:
    ci = ci or {}
    return {prefix: ci.get("point", float("nan")), f"{prefix}_low": ci.get("low", float("nan")),
            f"{prefix}_high": ci.get("high", float("nan"))}


def site_figures(y: np.ndarray, s: np.ndarray, patients: np.ndarray, threshold: float, n_boot: int, seed: int) -> dict:
    """The site's scalar figures on its patients (one score each), CIs resampling its patients."""
    out: dict = {"n_patients": int(len(y)), "n_positive": int(y.sum())}
    cis = auroc_cis(y, s, patients, n_boot, seed)
    out |= _flat("auroc", cis.get("auroc_delong_ci"))
    boot = cis.get("auroc_bootstrap_ci") or {}
    out["auroc_bootstrap_low"], out["auroc_bootstrap_high"] = boot.get("low", float("nan")), boot.get("high", float("nan"))
    rates = bootstrap_metrics(y, s, patients, threshold, n_boot=n_boot, seed=seed) if len(np.unique(y)) == 2 else {}
    for m in RATES:
        out |= _flat(m, rates.get(m))
    out["brier"] = float(np.mean((s - y) ** 2))
    out["mean_predicted"], out["observed_rate"] = float(s.mean()), float(y.mean())
    try:
        cal = calibration_slope_intercept(y, s)
    except Exception:  # noqa: BLE001 - one class, or perfect separation: no logistic fit
        cal = {}
    for key in ("intercept", "intercept_low", "intercept_high", "slope", "slope_low", "slope_high"):
        out[f"calibration_{key}"] = float(cal.get(key, float("nan")))
    return out


def summarize_site(config: EvaluationSite, edges: list[float], n_boot: int, seed: int, expected_digest: str | None = None,
                   engine: str = "torch") -> tuple[dict[str, np.ndarray], dict]:
    """Score the site's manifest with its bundle; (summable arrays, scalar figures). Refuses
    when its bundle is not the coordinator's (`expected_digest`)."""
    bundle = Bundle.load(config.bundle)
    ours = bundle_digest(bundle.info)
    if expected_digest is not None and expected_digest != ours:
        raise EvaluateError([f"site {config.site} holds bundle {ours[:12]}, the coordinator evaluates bundle "
                             f"{expected_digest[:12]}: copy the coordinator's bundle folder to this site"],
                            "stagewise federation evaluate")
    j, task = config.task(bundle)
    recipe = bundle_recipe(config.bundle)
    protocol = recipe.get("protocol") or {}
    cohort = config.cohort(bundle)
    prob = score_cohort(bundle, cohort, engine)[:, j]
    table, used = patient_table(cohort, prob, config.options.test_images or protocol.get("test_images", "all"),
                                config.options.aggregate or protocol.get("patient_aggregate", "mean"))
    y, s, threshold = table["y"].to_numpy(), table["score"].to_numpy(), float(task["threshold"])
    figures = site_figures(y, s, table["patient"].to_numpy(), threshold, n_boot, seed)
    figures["n_images"] = int(used.sum())
    arrays = {"histograms": class_histograms(y, s, np.asarray(edges, dtype=float)), "sums": site_sums(y, s, threshold)}
    return arrays, figures


__all__ = ["EvaluationSite", "SITE_FILE", "bundle_digest", "prepare_site", "site_figures", "summarize_site"]
