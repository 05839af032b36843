"""A site's privacy budget: the (epsilon, delta) its DP-SGD steps spend, from Opacus'
accountant, and the noise multiplier that spends a target epsilon over a whole fit.

The accountant composes every step a site took: each (noise multiplier, sampling rate,
steps) entry is one run of the subsampled Gaussian mechanism, as Opacus' RDP and PRV
accountants record it (`IAccountant.history`). `noise_for_target` searches the noise over
the site's whole history of stages (stages that differ in batch size differ in sampling
rate, which Opacus' `get_noise_multiplier` takes once). It does not bisect as that function
does: one RDP evaluation at Opacus' fractional orders takes about a second, so it solves
first at the integer orders alone (milliseconds; their epsilon is an upper bound of the full
one), then refines at every order with Brent's method on log noise against log epsilon
(nearly linear) in a narrow bracket, and ends from above: never more than the target.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np

from stagewise.recipe import MEANINGLESS_EPSILON, PrivacyConfig, Stage
from stagewise.training.engine import batches

MAX_NOISE = 1e6  # as Opacus' get_noise_multiplier: beyond this the budget is too small to reach


def stage_steps(stage: Stage, n_train: int) -> tuple[float, int]:
    """(sampling rate, DP-SGD steps) of one federated stage at a site with `n_train` training
    images: `rounds` x local `epochs` x batches per epoch, each image drawn with rate 1 / batches."""
    per_epoch = len(batches(np.arange(n_train), stage.batch_size))
    return 1.0 / per_epoch, per_epoch * stage.epochs * (stage.rounds or 1)


def epsilon_spent(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp",
                  alphas: list[float] | None = None) -> float:
    """Epsilon at `delta` after the (noise multiplier, sampling rate, steps) entries of
    `history`: 0 without steps, infinite where any step added no noise. `alphas`: the RDP
    orders (default: Opacus' own)."""
    from opacus.accountants import create_accountant

    merged: dict[tuple[float, float], int] = {}  # equal (noise, rate) entries compose by adding steps
    for noise, q, s in history:
        if s > 0:
            merged[float(noise), float(q)] = merged.get((float(noise), float(q)), 0) + int(s)
    if not merged:
        return 0.0
    if any(noise <= 0 for noise, _ in merged):
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [(n, q, s) for (n, q), s in merged.items()]
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": the integer orders' first pass
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta, **({"alphas": alphas} if alphas else {})))


def _root(excess, low: float, high: float, too_small: str) -> float:
    """The root of `excess` (log noise -> log epsilon - log target, falling) bracketed by
    stepping out from [low, high] by factors of 2 in noise."""
    from scipy.optimize import brentq

    while excess(high) > 0:
        low, high = high, high + math.log(2)
        if high > math.log(MAX_NOISE):
            raise ValueError(too_small)
    while excess(low) <= 0 and low > math.log(1e-3):
        high, low = low, low - math.log(2)
    return brentq(excess, low, high, xtol=1e-3)


@lru_cache(maxsize=256)
def _search(target: float, delta: float, shape: tuple[tuple[float, int], ...], accountant: str) -> float:
    from opacus.accountants import RDPAccountant  # imported here: opacus costs every process ~1 s at its start

    def excess(alphas):
        return lambda log_noise: math.log(epsilon_spent([(math.exp(log_noise), q, s) for q, s in shape], delta,
                                                        accountant, alphas) / target)

    too_small = (f"target epsilon {target:g} cannot be reached at delta {delta:g} with "
                 f"{sum(s for _, s in shape)} steps: the budget is too small")
    integer = [a for a in RDPAccountant.DEFAULT_ALPHAS if a == int(a)] if accountant == "rdp" else None
    guess = _root(excess(integer), 0.0, 0.0, too_small) if integer else 0.0
    noise = math.exp(_root(excess(None), guess - 0.2, guess, too_small))
    while epsilon_spent([(noise, q, s) for q, s in shape], delta, accountant) > target:
        noise *= 1.0 + 1e-3  # from above: never more than the target is spent
    return noise


def noise_for_target(target: float, delta: float, shape: list[tuple[float, int]], accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to about 0.1 %, from above) whose steps
    `shape` = [(sampling rate, steps), ...] spend at most `target` epsilon at `delta`."""
    return _search(float(target), float(delta), tuple((float(q), int(s)) for q, s in shape if s > 0),
                   accountant)


def site_noise(cfg: PrivacyConfig, stages: list[Stage], n_train: int) -> float:
    """The noise multiplier a site with `n_train` training images runs every stage with: the
    recipe's, or the one that spends `target_epsilon` over all `stages` (federated, with rounds)."""
    if cfg.noise_multiplier is not None:
        return float(cfg.noise_multiplier)
    return noise_for_target(cfg.target_epsilon, cfg.delta, [stage_steps(s, n_train) for s in stages], cfg.accountant)


def budget_text(epsilon: float | None, delta: float) -> str:
    """An epsilon as a reader should take it: 'epsilon 7.9 at delta 1e-05', stated plainly as
    no meaningful guarantee above `MEANINGLESS_EPSILON` (and when no noise was added)."""
    if epsilon is None:
        return "not accounted"
    if not math.isfinite(epsilon):
        return "epsilon infinite (no noise): no privacy guarantee"
    text = f"epsilon {epsilon:.3g} at delta {delta:g}"
    return text + (": no meaningful privacy guarantee" if epsilon > MEANINGLESS_EPSILON else "")


def privacy_summary(cfg: PrivacyConfig, rounds: list[dict]) -> dict:
    """The budget each site spent in one federated fit, from the DP-SGD steps its replies
    recorded round by round (`site_privacy` of each round record): epsilon at the recipe's
    delta by the recipe's accountant, the noise multiplier(s), sampling rate(s) and steps, and
    whether the guarantee means anything (`meaningful`: epsilon at most MEANINGLESS_EPSILON)."""
    history: dict[str, list[tuple[float, float, int]]] = {}
    for r in rounds:
        for site, p in (r.get("site_privacy") or {}).items():
            history.setdefault(site, []).append((p["noise_multiplier"], p["sample_rate"], p["steps"]))
    sites = {}
    for site, h in sorted(history.items()):
        eps = epsilon_spent(h, cfg.delta, cfg.accountant)
        sites[site] = {"epsilon": eps, "noise_multiplier": sorted({n for n, _, _ in h}),
                       "sample_rate": sorted({q for _, q, _ in h}), "steps": int(sum(s for _, _, s in h)),
                       "rounds": len(h), "meaningful": bool(math.isfinite(eps) and eps <= MEANINGLESS_EPSILON),
                       "statement": budget_text(eps, cfg.delta)}
    return {"mechanism": cfg.mechanism, "unit": "image", "clip": cfg.clip, "delta": cfg.delta,
            "accountant": cfg.accountant, "target_epsilon": cfg.target_epsilon, "sites": sites,
            "max_epsilon": max((s["epsilon"] for s in sites.values()), default=None)}


def privacy_over_folds(summaries: list[dict]) -> dict:
    """An arm's budget over its folds (each a `privacy_summary`): per site the epsilon of each
    fold and the largest, stated plainly. Each fold's model spends its budget on its own
    training images; models of several folds released together spend more (their training
    images overlap), which `note` says."""
    first = summaries[0]
    sites: dict[str, dict] = {}
    for fold in summaries:
        for site, p in fold["sites"].items():
            sites.setdefault(site, {"epsilon_per_fold": [], "steps_per_fold": [], "noise_multiplier": set()})
            sites[site]["epsilon_per_fold"].append(p["epsilon"])
            sites[site]["steps_per_fold"].append(p["steps"])
            sites[site]["noise_multiplier"] |= set(p["noise_multiplier"])
    for site, s in sites.items():
        s["epsilon_max"] = max(s["epsilon_per_fold"])
        s["noise_multiplier"] = sorted(s["noise_multiplier"])
        s["meaningful"] = bool(math.isfinite(s["epsilon_max"]) and s["epsilon_max"] <= MEANINGLESS_EPSILON)
        s["statement"] = budget_text(s["epsilon_max"], first["delta"])
    return {k: first[k] for k in ("mechanism", "unit", "clip", "delta", "accountant", "target_epsilon")} | {
        "sites": dict(sorted(sites.items())),
        "max_epsilon": max((s["epsilon_max"] for s in sites.values()), default=None),
        "note": ("epsilon per site for one fold's model, at the largest over the folds; the privacy unit is one "
                 "image (a patient with k images is protected as a group of k); the folds' models together, "
                 "trained on overlapping images, spend more than one fold's"),
    }


def job_privacy(cfg: PrivacyConfig, fold_rounds: list[list[dict]], final_rounds: list[dict] | None) -> dict:
    """A deployed job's budget (results.json): over its cross-validation folds as
    `privacy_over_folds`, and for the final model (trained on every image of each site; the
    model a bundle would carry) on its own."""
    out = privacy_over_folds([privacy_summary(cfg, r) for r in fold_rounds]) if fold_rounds else {}
    if final_rounds is not None:
        out["final_model"] = privacy_summary(cfg, final_rounds)
    return out
