"""An arm trained per site (`sites.mode: local`) or across sites (`federated`), on one fold.

Both modes start from the same network a pooled arm starts from (the arm's named weights
and a head drawn from the fold seed), use only the fold's training rows of each site, and
return one probability per cohort row asked for, so that the study scores them on exactly
the same patients as a pooled arm:
- local: each site trains alone; a row is scored by its own site's model (and, for the
  cross-site figures, by every other site's model too);
- federated: each site is a Flower client (federated.simulation); a row is scored by its
  site's final model, a row of a site that took no part (the held-out site of
  leave-one-site-out) by the server's model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from stagewise.errors import RunError
from stagewise.federated.simulation import run_federated
from stagewise.federated.site import SitePartition, round_seed, site_seed
from stagewise.federated.secure_aggregation import secure_summary
from stagewise.models import Network
from stagewise.evaluation.metrics import patient_auroc
from stagewise.study.cross_site import federated_matrix
from stagewise.recipe import STRATEGY_NAMES, ArmConfig
from stagewise.training.cache import ImageSet, PrefixCache
from stagewise.training.compute import Compute
from stagewise.training.engine import fit_stage, predict, prepare_network
from stagewise.text import counted
from stagewise.training.privacy_budget import privacy_summary


@dataclass
class SiteFit:
    """Probabilities for the rows asked for, and what the fold records about the sites."""

    prob: np.ndarray
    """(rows, outputs), in the order of the `rows` argument."""
    info: dict = field(default_factory=dict)
    server: Network | None = None
    """A federated fold's final global model (None for local arms, and for FedBN arms and arms
    with `sites.local_groups`, whose global model lacks what each site kept)."""
    global_prob: np.ndarray | None = None
    """Cross-site evaluation of an arm whose personalisation starts from a complete global model
    (BatchNorm averaged, no `sites.local_groups`): that global model's probabilities on the
    fold's test rows (the study's machine holds every site's rows in its simulation)."""

    def with_global_scores(self, preds):
        """The fold's test predictions with the global model's probability beside each row's
        own (`prob_global`, for the per-site figures of global against personalised models)."""
        return preds if self.global_prob is None else preds.assign(prob_global=self.global_prob[:, 0].astype(float))


def rows_by_site(sites: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Site -> its rows among `rows`, sites in order of first appearance."""
    out: dict[str, list[int]] = {}
    for r in rows:
        out.setdefault(str(sites[r]), []).append(int(r))
    return {s: np.asarray(v, dtype=int) for s, v in out.items()}


def fit_local(arm: ArmConfig, start: Network, images: ImageSet, targets: torch.Tensor, sites: np.ndarray,
              train: np.ndarray, rows: np.ndarray, compute: Compute, cache: PrefixCache | None, seed: int,
              y: np.ndarray, patients: np.ndarray, test: np.ndarray, how: str) -> SiteFit:
    """Each site trains on its own training rows; every row is scored by its site's model."""
    models: dict[str, Network] = {}
    for site, site_train in rows_by_site(sites, train).items():
        net = prepare_network(copy.deepcopy(start), compute)
        s = site_seed(seed, site)
        for i, stage in enumerate(st for st in arm.stages if not st.external):
            fit_stage(net, stage, images, site_train, targets, compute, cache, round_seed(s, i, 0))
        models[site] = net
    every = {site: predict(net, images, rows, compute, cache) for site, net in models.items()}
    prob = np.full((len(rows), targets.shape[1]), np.nan)
    unscored = set()
    for i, r in enumerate(rows):
        own = str(sites[r])
        if own in every:
            prob[i] = every[own][i]
        else:  # a site with no training rows in this fold: the mean of the site models
            prob[i] = np.mean([p[i] for p in every.values()], axis=0)
            unscored.add(own)
    position = {int(r): i for i, r in enumerate(rows)}
    cross = {}
    for model_site, p in every.items():
        cross[model_site] = {}
        for test_site, site_test in rows_by_site(sites, test).items():
            idx = [position[int(r)] for r in site_test]
            cross[model_site][test_site] = patient_auroc(p[idx, 0], site_test, y, patients, how)
    info = {"mode": "local", "sites_trained": {s: int(len(r)) for s, r in rows_by_site(sites, train).items()},
            "cross_site_auroc": cross}
    if unscored:
        info["scored_by_mean_of_site_models"] = sorted(unscored)
    return SiteFit(prob, info)


def site_partitions(images: ImageSet, targets: torch.Tensor, sites: np.ndarray, train: np.ndarray,
                    rows: np.ndarray) -> tuple[list[SitePartition], list[np.ndarray]]:
    """One Flower client's partition per site with training rows (its training rows, then the
    other rows of `rows` it scores), and per partition the cohort rows it scores, in order."""
    by_site = rows_by_site(sites, train)
    wanted = rows_by_site(sites, rows)
    partitions, order = [], []
    for site, site_train in by_site.items():
        score = wanted.get(site, np.zeros(0, dtype=int))
        own = np.concatenate([site_train, np.setdiff1d(score, site_train)])  # its training rows, then the rest
        at = {int(r): i for i, r in enumerate(own)}
        partitions.append(SitePartition(
            site=site, images=ImageSet(images.x[torch.as_tensor(own)], f"{images.key}:site:{site}"),
            targets=targets[torch.as_tensor(own)], train=np.arange(len(site_train)),
            score=np.asarray([at[int(r)] for r in score], dtype=int)))
        order.append(score)
    return partitions, order


def has_site_local(arm: ArmConfig) -> bool:
    """Whether the arm ends with personalisation (`site_local` stages at each site alone)."""
    return any(s.site_local for s in arm.stages)


def personalisation(arm: ArmConfig, sites_trained: list[str], held_out: list[str]) -> dict:
    """What a fold records of its personalisation stages: which, which sites' patients their
    personalised models scored, and which were scored by the global model instead (a site with
    no training rows, the held-out site of leave-one-site-out: it has no personalised model)."""
    if not has_site_local(arm):
        return {}
    kinds = [f"{i}:{s.kind}" for i, s in enumerate(st for st in arm.stages if not st.external) if s.site_local]
    out = {"stages": kinds, "sites": sites_trained, "scored_by_global_model": held_out}
    if held_out:
        out["note"] = (f"{', '.join(held_out)} took no part in training, so has no personalised model: its patients "
                       "are scored by the global federated model")
    return {"personalised": out}


def fit_federated(arm: ArmConfig, start: Network, images: ImageSet, targets: torch.Tensor, sites: np.ndarray,
                  train: np.ndarray, rows: np.ndarray, compute: Compute, seed: int,
                  y: np.ndarray, patients: np.ndarray, test: np.ndarray, how: str) -> SiteFit:
    """Sites with training rows are Flower clients holding only their own rows; under
    `sites.cross_site_evaluation` the fold records the cross-site matrix of their models."""
    by_site = rows_by_site(sites, train)
    partitions, order = site_partitions(images, targets, sites, train, rows)
    result = run_federated(arm, start, partitions, compute, seed)
    prob = np.full((len(rows), targets.shape[1]), np.nan)
    position = {int(r): i for i, r in enumerate(rows)}
    for k, score in enumerate(order):
        for j, r in enumerate(score):
            prob[position[int(r)]] = result.scores[k][j]
    rest = [i for i, r in enumerate(rows) if str(sites[r]) not in by_site]
    held_out = sorted({str(sites[rows[i]]) for i in rest})
    server = prepare_network(copy.deepcopy(start), compute)
    server.load_state_dict(result.global_state)
    if rest and arm.sites.local_groups:
        raise RunError(f"arm {arm.name!r}: sites {held_out} have no training rows "
                       "in this fold, and the groups each site keeps (sites.local_groups) have no global version to "
                       "score them with; give every site training patients in every fold (fewer folds)")
    if rest:  # a site that took no part: the server's model
        prob[rest] = predict(server, images, rows[rest], compute, None)
    sent = sum(r["bytes_down_per_site"] * r["sites"] + sum(r["bytes_up"]) for r in result.rounds)
    full = 2 * result.full_model_bytes * sum(r["sites"] for r in result.rounds)
    info = {
        "mode": "federated", "strategy": arm.sites.strategy, "bn_stats": arm.sites.bn_stats,
        **({"local_groups": list(arm.sites.local_groups)} if arm.sites.local_groups else {}),
        "sites_trained": {s: int(len(r)) for s, r in by_site.items()},
        "scored_by_server_model": held_out,
        "rounds": result.rounds,
        "bytes_total": int(sent), "bytes_full_model_fedavg": int(full),
        "full_model_bytes": int(result.full_model_bytes),
        **personalisation(arm, sorted(by_site), held_out),
    }
    if arm.sites.privacy is not None:  # the budget each site spent, by Opacus' accountant
        info["privacy"] = privacy_summary(arm.sites.privacy, result.rounds)
    if arm.sites.secure_aggregation is not None:  # Flower's SecAgg+: its settings and error bound
        info["secure_aggregation"] = secure_summary(arm.sites.secure_aggregation, result.rounds)
    complete = arm.sites.bn_stats == "average" and not arm.sites.local_groups
    fit = SiteFit(prob, info, server if complete and not has_site_local(arm) else None)
    if arm.sites.cross_site_evaluation:
        names = [p.site for p in partitions]
        info["cross_site"] = {
            "auroc": federated_matrix(names, order, result.scores, result.cross_scores, test, y, patients, how),
            "site_models_left_sites": True,
            "site_model_bytes": {names[k]: int(v) for k, v in result.cross_site["site_model_bytes"].items()},
            "bytes_down_total": int(result.cross_site["bytes_down_total"])}
        if complete:  # the global model before personalisation, on the same test patients
            fit.global_prob = predict(server, images, test, compute, None)
            info["cross_site"]["global_auroc"] = {
                site: patient_auroc(fit.global_prob[np.isin(test, site_test), 0], site_test, y, patients, how)
                for site, site_test in rows_by_site(sites, test).items()}
    return fit


def export_refusal(arm: ArmConfig, refit: bool) -> str | None:
    """Why the arm's model cannot be exported this way (None: it can). A bundle holds one
    network; it must be the network whose training the bundle's card describes."""
    mode, name = arm.sites.mode, arm.name
    if mode == "local" and refit:
        return (f"arm {name!r} trains one model per site (sites.mode: local), so a refit has no single model to "
                "bundle; export a pooled arm or a federated arm (sites.mode: federated) with --refit instead")
    if mode == "federated" and arm.sites.bn_stats == "local" and refit:
        return (f"arm {name!r} keeps BatchNorm at each site (FedBN, sites.bn_stats: local), so federated training "
                "ends with one model per site and no single global model to bundle; export an arm with "
                "sites.bn_stats: average, or a pooled arm, with --refit instead")
    if mode == "federated" and has_site_local(arm) and refit:
        return (f"arm {name!r} ends with personalisation (site_local stages), so its patients are scored by one "
                "model per site and the global model is not the model its figures describe; export an arm without "
                "site_local stages, or a pooled arm, with --refit instead")
    if mode == "federated" and arm.sites.local_groups and refit:
        return (f"arm {name!r} keeps {', '.join(arm.sites.local_groups)} at each site (sites.local_groups), so "
                "federated training ends with one model per site and no single global model to bundle; export an "
                "arm without sites.local_groups, or a pooled arm, with --refit instead")
    if mode != "pooled" and not refit:
        scored_by = ("its own site's model" if mode == "local"
                     else "its site's final model (the aggregated tensors over that site's own state)")
        return (f"arm {name!r} trains per site (sites.mode: {mode}): each fold's scores come from {scored_by}, "
                "and no single fold model is saved whose scores they are; export it with --refit"
                + (" (federated training over every image of each site)" if mode == "federated" else
                   " is refused too (one model per site): export a pooled or federated arm"))
    return None


def refit_federated(arm: ArmConfig, start: Network, images: ImageSet, targets: torch.Tensor, sites: np.ndarray,
                    compute: Compute, seed: int) -> tuple[Network, dict]:
    """The arm trained federated on every image of each site (each site a Flower client that
    holds only its own rows, all of them training rows): the deployable model is the final
    global model, `start` with every aggregated tensor in place. Returns it and how it was trained."""
    refusal = export_refusal(arm, refit=True)
    if refusal:
        raise RunError(refusal)
    everything = np.arange(len(targets))
    partitions, _ = site_partitions(images, targets, sites, everything, np.zeros(0, dtype=int))
    result = run_federated(arm, start, partitions, compute, seed)
    net = copy.deepcopy(start).cpu()
    net.load_state_dict(result.global_state)
    images_per_site = {p.site: int(len(p.train)) for p in partitions}
    replied = [r["sites_replied"] for r in result.rounds]
    strategy = STRATEGY_NAMES.get(arm.sites.strategy, arm.sites.strategy)
    fewest = min(replied) if replied else 0
    description = (f"federated: {strategy} over {len(partitions)} sites, {counted(len(result.rounds), 'round')}, on every image "
                   f"of each site ({', '.join(f'{s}: {n}' for s, n in images_per_site.items())} images); the model is "
                   "the final global model"
                   + (f" (some rounds completed with {fewest} of {len(partitions)} sites)" if fewest < len(partitions) else ""))
    info = {"mode": "federated", "strategy": arm.sites.strategy, "bn_stats": arm.sites.bn_stats,
            "sites": len(partitions), "images_per_site": images_per_site, "rounds": len(result.rounds),
            "sites_replied_per_round": replied, "description": description}
    return net, info
