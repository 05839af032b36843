"""The report's federated part: per federated arm how it trained (the strategy with its
parameters, rounds and local epochs per stage, what each round shared) and its training loss
per round, per site and as the weighted mean, in a table and a figure; for an arm with
`sites.privacy`, the epsilon each site spent beside the AUROC.

The settings are the recipe's (recipe.yaml, as the round loop read them); the rounds, bytes
and losses are values of metrics.json (`sites_training.rounds` and `round_loss`, summarised
from the folds' round records by `study.summaries`), formatted and nothing else. The stage and
unfreeze wording is shared with the checklist, so the two never describe a stage differently.
"""

from __future__ import annotations

from stagewise.recipe import RecipeError, parse_stage, strategy_text
from stagewise.report.figures import round_loss_figure
from stagewise.report.formatting import DASH, fmt_mean_sd, fmt_num, fmt_setting


def is_federated(unit: dict) -> bool:
    return (unit.get("sites_training") or {}).get("mode") == "federated"


def fold_stages(arm: dict) -> list[dict]:
    """The stages an arm trains in each fold, in order (stages on a source manifest run once
    before the folds and have no rounds): the indices the round records count."""
    return [s for s in arm.get("stages") or [] if not s.get("source")]


def unfreeze_text(stage: dict, federated: bool) -> str:
    """When each group of a thaw stage starts to train, in the stage's own unit: epochs, or
    rounds for a federated arm (whose `epochs` are the local epochs of every round), e.g.
    'layer4 from epoch 1, layer3 from epoch 11 of 20 (unfreeze fractions 0, 0.5 of the stage's
    epochs)'. Empty for a stage without `unfreeze`."""
    fractions = stage.get("unfreeze")
    if not fractions:
        return ""
    unit = "round" if federated else "epoch"
    n = stage.get("rounds") if federated else stage.get("epochs")
    try:
        starts = parse_stage({**stage, "epochs": n, "rounds": None}).start_epochs()
    except (RecipeError, TypeError):
        return f"unfreeze fractions {fmt_setting(fractions)} of the stage's {unit}s"
    order = sorted(fractions, key=lambda g: (starts[g], g))
    return (", ".join(f"{g} from {unit} {starts[g] + 1}" for g in order) + f" of {n} (unfreeze fractions "
            + ", ".join(fmt_setting(fractions[g]) for g in order) + f" of the stage's {unit}s)")


def round_schedule(stage: dict) -> str:
    """A federated stage's length: rounds times the local epochs each site trains per round;
    a personalisation stage's (`site_local`): its epochs at each site alone, after the rounds."""
    rounds, epochs = stage.get("rounds"), stage.get("epochs")
    if stage.get("site_local"):
        return (f"{epochs} epoch{'s' if epochs != 1 else ''} at each site alone on its own training rows, after "
                "the rounds (personalisation: nothing it trains leaves the site)")
    return (f"{rounds} round{'s' if rounds != 1 else ''} × {epochs} local epoch{'s' if epochs != 1 else ''} "
            "per round at each site")


def recorded_sites(round_loss: list[dict]) -> list[str]:
    """The sites whose losses the rounds recorded, by name."""
    return sorted({s for r in round_loss for s in r.get("sites", {})})


def fmt_bytes(n) -> str:
    if n is None:
        return DASH
    return f"{fmt_num(n / 1e6, 2)} MB" if n >= 1e6 else f"{fmt_num(n / 1e3, 1)} kB"


def federated_sections(arms: dict, order: list[str], r_arms: dict, colors: dict,
                       cross_site: dict | None = None) -> list[dict]:
    """One panel per federated unit: its strategy, stages, and per round what was shared and the
    training loss per site and weighted mean (the mean over the folds that recorded the round);
    `cross_site`, unit -> its cross-site panel (report.cross_site), where it has one."""
    panels = []
    for name in order:
        unit = arms[name]
        if not is_federated(unit):
            continue
        arm = r_arms.get(unit.get("base_arm")) or {}
        stages = fold_stages(arm)
        losses = unit["sites_training"].get("round_loss") or []
        shared = {r["round"]: r for r in unit["sites_training"].get("rounds") or []}
        sites = recorded_sites(losses)
        kept = (arm.get("sites") or {}).get("local_groups") or []
        rows = []
        for r in losses:
            stage = stages[r["stage"]] if r["stage"] < len(stages) else {}
            s = shared.get(r["round"], {})
            up = s.get("bytes_up") or []
            rows.append({
                "round": r["round"], "stage": f"{r['stage'] + 1} ({stage.get('kind', DASH)})",
                "groups": shared_groups(r.get("trainable") or [], kept),
                "down": fmt_bytes(s.get("bytes_down_per_site")), "up": fmt_bytes(sum(up) / len(up) if up else None),
                "sites": [fmt_num(r["sites"].get(site)) for site in sites], "loss": fmt_num(r.get("loss")),
            })
        panels.append({
            "unit": name, "strategy": strategy_text(arm.get("sites") or {}) if arm else DASH,
            "stages": [{"stage": f"{i + 1} ({st.get('kind')})", "schedule": round_schedule(st),
                        "unfreeze": unfreeze_text(st, not st.get("site_local")) or DASH} for i, st in enumerate(stages)],
            "personalised": personalised_text(unit["sites_training"].get("personalised")),
            "sites": sites, "rows": rows, "folds": max((r.get("folds", 0) for r in losses), default=0),
            "figure": round_loss_figure(name, losses, sites, colors[name]),
            "privacy": privacy_panel(unit),
            "cross_site": (cross_site or {}).get(name),
        })
    return panels


def shared_groups(trainable: list[str], kept: list[str]) -> str:
    """The groups a round aggregated: those that trained, less the ones each site keeps."""
    shared = [g for g in trainable if g not in kept]
    return ", ".join(shared) if shared else (f"none ({', '.join(trainable)} trained, kept at each site)"
                                             if trainable else DASH)


def personalised_text(personalised: dict | None) -> str:
    """Which patients the personalised models scored, and which the global model did."""
    if not personalised:
        return ""
    held_out = personalised.get("scored_by_global_model") or []
    return ("Each site's test patients are scored by its own model, personalised by the site_local stage(s) on "
            "that site's training rows" + (f"; {', '.join(held_out)} took no part in training in some fold(s) and "
                                           "has no personalised model there: the global federated model scored its "
                                           "patients" if held_out else "") + ".")


def privacy_panel(unit: dict) -> dict | None:
    """A DP-SGD arm's budget beside its AUROC: per site the epsilon its DP-SGD spent (the
    largest over the folds, as metrics.json's `sites_training.privacy` holds it), stated
    plainly where it is no meaningful guarantee, the noise and steps, and the site's AUROC."""
    p = unit["sites_training"].get("privacy")
    if not p:
        return None
    rows = [{"site": site, "epsilon": fmt_num(s["epsilon_max"], 2) if s["epsilon_max"] is not None else "∞",
             "statement": s["statement"], "meaningful": s["meaningful"],
             "noise": ", ".join(fmt_num(n) for n in s["noise_multiplier"]),
             "steps": ", ".join(str(n) for n in sorted(set(s["steps_per_fold"]))),
             "auroc": fmt_mean_sd(((unit.get("sites") or {}).get(site) or {}).get("auroc"))} for site, s in p["sites"].items()]
    target = f"; target epsilon {fmt_num(p['target_epsilon'])} per site" if p.get("target_epsilon") else ""
    return {"rows": rows, "auroc": fmt_mean_sd((unit.get("summary") or {}).get("auroc")),
            "settings": (f"DP-SGD per image (Opacus): gradients clipped to L2 norm {fmt_num(p['clip'])}, Gaussian noise, "
                         f"delta {p['delta']:g} per site, {p['accountant'].upper()} accountant{target}"),
            "note": p["note"]}


def nav_with_federated(nav: list[tuple[str, str]], panels: list[dict]) -> list[tuple[str, str]]:
    """The table of contents with the federated section, after the sites, where a run has one."""
    if not panels:
        return nav
    at = next((i for i, (key, _) in enumerate(nav) if key in ("tuning", "training-curves", "saliency", "checklist")),
              len(nav))
    return [*nav[:at], ("federated", "Federated training"), *nav[at:]]
