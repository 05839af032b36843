"""The report's cross-site figures: each per-site model scored on every site's test patients,
as one matrix (a row per site model, a column per site's test patients, the diagonal each
site's model on its own patients) for a local arm (`sites_training.cross_site_auroc`) and for
a federated arm run with `sites.cross_site_evaluation` (`sites_training.cross_site`); and per
site, the federated arm's global model, its personalised (site) models and the study's local
arm side by side with their patient-bootstrap 95 % CIs (`evidence.units`). Values of
metrics.json, formatted and nothing else.
"""

from __future__ import annotations

from stagewise.report.federated import fmt_bytes
from stagewise.report.formatting import DASH, fmt_num, fmt_point_ci


def matrix_table(matrix: dict) -> dict:
    """A matrix of mean AUROCs over folds as the template's table: the site models' rows, the
    tested sites' columns (in the rows' order, then any other), own-site cells marked."""
    models = list(matrix)
    sites = [*models, *sorted({b for row in matrix.values() for b in row} - set(models))]
    return {"sites": sites, "rows": [{"model": a, "cells": [{"value": fmt_num(matrix[a].get(b)), "own": a == b}
                                                            for b in sites]} for a in models]}


def local_matrices(arms: dict, order: list[str]) -> list[dict]:
    """Every local arm's cross-site matrix (each site's model alone, scored on every site)."""
    return [{"unit": n, **matrix_table(arms[n]["sites_training"]["cross_site_auroc"])} for n in order
            if (arms[n].get("sites_training") or {}).get("mode") == "local"
            and arms[n]["sites_training"].get("cross_site_auroc")]


def _ci(evidence: dict, unit: str | None, key: str, site: str) -> str:
    entry = (((evidence.get(unit) or {}).get(key) or {}).get(site) or {}).get("auroc_bootstrap_ci")
    return fmt_point_ci(entry) if entry else DASH


def matching_local_arm(arms: dict, order: list[str], unit: dict) -> str | None:
    """The study's first local arm at the unit's label fraction (its per-site comparison), if any."""
    return next((n for n in order if (arms[n].get("sites_training") or {}).get("mode") == "local"
                 and arms[n].get("label_fraction") == unit.get("label_fraction")), None)


def _size_range(sizes: list[int]) -> str:
    low, high = fmt_bytes(min(sizes)), fmt_bytes(max(sizes))
    return low if low == high else f"{low} to {high}"


def cross_site_panel(name: str, arms: dict, order: list[str], evidence: dict) -> dict | None:
    """A federated unit's cross-site part: the matrix of its site models, per site the global,
    personalised and local AUROCs with CIs, and what left the sites for it; None without
    `sites.cross_site_evaluation`."""
    cross = (arms[name].get("sites_training") or {}).get("cross_site")
    if not cross:
        return None
    local = matching_local_arm(arms, order, arms[name])
    table = matrix_table(cross["auroc"])
    sizes = list((cross.get("site_model_bytes") or {}).values())
    has_global = "global_auroc" in cross
    return {
        "matrix": table, "local": local,
        "local_matrix": matrix_table(arms[local]["sites_training"]["cross_site_auroc"]) if local else None,
        "rows": [{"site": s, "global": _ci(evidence, name, "sites_global_model", s) if has_global else DASH,
                  "personalised": _ci(evidence, name, "sites", s), "local": _ci(evidence, local, "sites", s)}
                 for s in table["sites"]],
        "left": ("For this evaluation each site's own model left its site (sites.cross_site_evaluation): the tensors "
                 "in which it differs from the global model, "
                 + (f"{_size_range(sizes)} per site, " if sizes else "")
                 + "went to the coordinator, which forwarded them to every other site; each site scored its own rows "
                 "with every model it received and returned the scores (the matrix uses each site's test patients). "
                 f"Matrix: mean AUROC over "
                 f"{cross.get('folds', DASH)} fold(s)."),
        "global_note": ("Global: the final global federated model before personalisation." if has_global else
                        "Global: none, as this arm keeps groups or BatchNorm at each site (sites.local_groups, FedBN), "
                        "so its global model lacks what each site kept."),
    }
