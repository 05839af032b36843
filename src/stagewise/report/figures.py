"""The report's figures: matplotlib drawings of metrics.json curves, returned as embedded PNG data.

Kept apart from reading the run and from the HTML, the way scikit-learn keeps its Display plotting
apart from the computing: each function takes curves already in metrics.json and draws them, and
computes nothing. Figures are drawn on matplotlib's Agg canvas through `Figure` (no pyplot, so the
caller's backend is left alone) in one shared style, and come back as `data:image/png;base64,...`
URIs so the report opens offline. PNG metadata carries no software version, so the same curves
give the same bytes.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

from stagewise.report.formatting import finite, fmt_fraction, fmt_num

DPI = 100
PNG_URI_PREFIX = "data:image/png;base64,"

_STYLE = {
    "font.size": 8.5,
    "axes.titlesize": 9.5,
    "axes.labelsize": 8.5,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e6e8eb",
    "grid.linewidth": 0.6,
    "axes.edgecolor": "#8a8f98",
    "axes.linewidth": 0.7,
    "font.family": ["DejaVu Sans"],
}
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f"]
_REFERENCE = "#9aa0a6"  # the chance / perfect-calibration diagonal and the AUROC 0.5 line


def png_data_uri(data: bytes) -> str:
    """PNG bytes as a `data:` URI an <img src> can hold."""
    return PNG_URI_PREFIX + base64.b64encode(data).decode("ascii")


def palette(names: list[str]) -> dict[str, str]:
    """One colour per unit, in report order, shared by the tables' swatches and every figure."""
    return {n: _COLORS[i % len(_COLORS)] for i, n in enumerate(names)}


def _mpl_text(s: Any) -> str:
    return str(s).replace("$", r"\$")  # user text must not switch matplotlib into mathtext


def _draw_png(draw: Callable[[Any], None], width: float = 5.0, height: float = 4.1) -> str:
    """Run `draw(ax)` on one fresh Axes in the report style; the figure as a PNG data URI."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(width, height), dpi=DPI)
        draw(fig.add_subplot(1, 1, 1))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.06, metadata={"Software": None})
    return png_data_uri(buf.getvalue())


def _curves_png(units: list[str], ev: dict, key: str, draw: Callable[[Any, list[str]], None]) -> str | None:
    """`draw(ax, shown)` for the units whose metrics.json evidence has curve `key`; None when none has it."""
    shown = [u for u in units if ev.get(u, {}).get(key)]
    return _draw_png(lambda ax: draw(ax, shown)) if shown else None


def _unit_square(ax, legend: str, **labels: str) -> None:
    """Probability axes, both 0 to 1 at equal scale, with the legend at `legend` (ROC, calibration)."""
    ax.set(xlim=(0, 1), ylim=(0, 1.01), **labels)
    ax.set_aspect("equal")
    ax.legend(loc=legend, frameon=False)


def roc_figure(units: list[str], ev: dict, colors: dict) -> str | None:
    """ROC curves of the pooled patients with their bootstrap bands; None when no unit has one."""

    def draw(ax, shown: list[str]) -> None:
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color=_REFERENCE)
        for u in shown:
            roc = ev[u]["roc"]
            point = ev[u].get("auroc_delong_ci", {}).get("point")
            ax.fill_between(roc["fpr"], roc["tpr_low"], roc["tpr_high"], color=colors[u], alpha=0.13, lw=0)
            ax.plot(roc["fpr"], roc["tpr"], color=colors[u], lw=1.6,
                    label=_mpl_text(f"{u}  (AUROC {fmt_num(point)})"))
        _unit_square(ax, "lower right", xlabel="1 − specificity (false-positive rate)",
                     ylabel="sensitivity (true-positive rate)", title="ROC, pooled patients, 95 % bootstrap band")

    return _curves_png(units, ev, "roc", draw)


def _band(ax, x: list, low: list | None, high: list | None, color: str) -> None:
    """A curve's 95 % band where metrics.json has one (None entries: no band at that point)."""
    if not low or not high:
        return
    nan = float("nan")
    ax.fill_between(x, [nan if v is None else v for v in low], [nan if v is None else v for v in high],
                    color=color, alpha=0.13, lw=0)


def calibration_figure(units: list[str], ev: dict, colors: dict,
                       title: str = "Calibration (quantile bins of patients)") -> str | None:
    """Calibration curves: the quantile bins of patients as points, the LOWESS smooth as a line
    and its patient-bootstrap 95 % band where metrics.json has them (runs before the smooth
    existed: the bins joined by lines); None when no unit has a curve."""

    def draw(ax, shown: list[str]) -> None:
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color=_REFERENCE, label="perfect calibration")
        notes = []
        for u in shown:
            c = ev[u]["calibration_curve"]
            smooth = c.get("smooth") or {}
            if not any(v is not None for v in smooth.get("observed") or []):
                ax.plot(c["prob_pred"], c["prob_true"], marker="o", ms=3.5, lw=1.3, color=colors[u], label=_mpl_text(u))
                continue
            notes += ["dots: bins", "line: LOWESS"]
            if smooth.get("low"):
                notes.append("band: 95 % patient bootstrap")
                _band(ax, smooth["prob"], smooth["low"], smooth["high"], colors[u])
            ax.plot(smooth["prob"], [float("nan") if v is None else v for v in smooth["observed"]], lw=1.5,
                    color=colors[u], label=_mpl_text(u))
            ax.plot(c["prob_pred"], c["prob_true"], ls="none", marker="o", ms=3.5, color=colors[u], alpha=0.8)
        _unit_square(ax, "upper left", xlabel="mean predicted probability", ylabel="observed fraction positive",
                     title="\n".join([title, " · ".join(dict.fromkeys(notes))]) if notes else title)

    return _curves_png(units, ev, "calibration_curve", draw)


def decision_figure(units: list[str], ev: dict, colors: dict, title: str = "Decision curves") -> str | None:
    """Decision curves with their patient-bootstrap 95 % bands where metrics.json has them, and
    treat-all and treat-none (from the first unit shown); None without curves."""

    def draw(ax, shown: list[str]) -> None:
        ref = ev[shown[0]]["decision_curve"]
        tops = [max(ref["net_benefit_all"], default=0)]
        banded = False
        for u in shown:
            d = ev[u]["decision_curve"]
            if d.get("net_benefit_model_low"):
                banded = True
                _band(ax, d["threshold"], d["net_benefit_model_low"], d["net_benefit_model_high"], colors[u])
            ax.plot(d["threshold"], d["net_benefit_model"], color=colors[u], lw=1.5, label=_mpl_text(u))
            tops.append(max(d["net_benefit_model"], default=0))
        ax.plot(ref["threshold"], ref["net_benefit_all"], color="#333333", lw=1.0, ls="-.", label="treat all")
        ax.plot(ref["threshold"], ref["net_benefit_none"], color="#333333", lw=1.0, ls=":", label="treat none")
        top = max(max(tops), 0.01)
        ax.set_ylim(-0.15 * top, 1.08 * top)
        ax.set_xlim(min(ref["threshold"]), max(ref["threshold"]))
        ax.set(xlabel="threshold probability", ylabel="net benefit",
               title=f"{title}\nband: 95 % patient bootstrap" if banded else title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    return _curves_png(units, ev, "decision_curve", draw)


def label_efficiency_figure(curves: dict, colors: dict) -> str | None:
    """Fold-mean AUROC ± sd against the fraction of training labels, one line per arm; None without curves."""
    if not curves:
        return None

    def draw(ax) -> None:
        fractions = sorted({r["fraction"] for c in curves.values() for r in c})
        for i, (arm, rows) in enumerate(curves.items()):
            x = [r["fraction"] * (1 + 0.025 * (i - (len(curves) - 1) / 2)) for r in rows]  # dodge overlapping bars
            sd = [r["auroc_sd"] if finite(r["auroc_sd"]) else 0.0 for r in rows]
            ax.errorbar(x, [r["auroc_mean"] for r in rows], yerr=sd, marker="o", ms=4, lw=1.4, capsize=3,
                        color=colors.get(arm, None), label=_mpl_text(arm))
        ax.axhline(0.5, ls="--", lw=0.8, color=_REFERENCE)
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([fmt_fraction(f) for f in fractions])
        ax.minorticks_off()
        ax.set_xlim(min(fractions) / 1.35, max(fractions) * 1.35)
        ax.set(xlabel="fraction of training labels (log scale)", ylabel="AUROC, fold mean ± sd",
               title="Label efficiency")
        ax.legend(loc="lower right", frameon=False)

    return _draw_png(draw, 5.0, 3.7)


def site_forest_figure(units: list[str], ev: dict, colors: dict) -> str | None:
    """Per-site AUROC with patient-bootstrap 95 % CIs, one row per site and unit (a forest
    plot); None when the run has no sites."""
    rows = [(site, u, rec["auroc_bootstrap_ci"]) for u in units
            for site, rec in (ev.get(u, {}).get("sites") or {}).items() if rec.get("auroc_bootstrap_ci")]
    if not rows:
        return None
    sites = list(dict.fromkeys(site for site, _, _ in rows))

    def draw(ax) -> None:
        step = 1.0 / (len(units) + 1)
        for i, u in enumerate(units):
            mine = [(sites.index(site), ci) for site, unit, ci in rows if unit == u]
            if not mine:
                continue
            y = [k + (i + 1) * step for k, _ in mine]
            x = [ci["point"] for _, ci in mine]
            err = [[ci["point"] - ci["low"] for _, ci in mine], [ci["high"] - ci["point"] for _, ci in mine]]
            ax.errorbar(x, y, xerr=err, fmt="o", ms=4, capsize=2.5, lw=1.2, color=colors.get(u), label=_mpl_text(u))
        ax.axvline(0.5, ls="--", lw=0.8, color=_REFERENCE)
        ax.set_yticks([k + 0.5 for k in range(len(sites))])
        ax.set_yticklabels([_mpl_text(s) for s in sites])
        ax.set_ylim(len(sites), 0)
        ax.set_xlim(0, 1)
        ax.set(xlabel="AUROC on the site's test patients [95 % patient-bootstrap CI]", title="Per site")
        ax.legend(loc="lower left", frameon=False)

    return _draw_png(draw, 5.6, 1.2 + 0.9 * len(sites))


def training_curve_figure(unit: str, curves: list[dict], color: str) -> str | None:
    """Training loss per epoch of one unit, one line per fold, its stages one after another
    (dotted lines where a stage begins); None when no fold logged epochs."""
    folds = [c for c in curves if any(st.get("loss") for st in c.get("stages", []))]
    if not folds:
        return None

    def draw(ax) -> None:
        bounds: list[tuple[int, str]] = []
        for i, c in enumerate(folds):
            losses, start = [], 0
            for st in c["stages"]:
                if i == 0:
                    bounds.append((start, st["kind"]))
                losses += st.get("loss", [])
                start += len(st.get("loss", []))
            ax.plot(range(1, len(losses) + 1), losses, color=color, lw=1.0, alpha=0.55,
                    label="one line per fold" if i == 0 else None)
        top = ax.get_ylim()[1]
        for start, kind in bounds:
            if start:
                ax.axvline(start + 0.5, color=_REFERENCE, lw=0.8, ls=":")
            ax.text(start + 0.7, top, _mpl_text(kind), fontsize=7, va="top", color="#4d5866")
        ax.set(xlabel="epoch", ylabel="training loss", title=_mpl_text(f"{unit}: training loss per epoch"))
        ax.legend(loc="upper right", frameon=False)

    return _draw_png(draw, width=4.2, height=2.8)


def round_loss_figure(unit: str, rows: list[dict], sites: list[str], color: str) -> str | None:
    """A federated arm's training loss per round (the rows of `study.summaries.round_losses`):
    each site's loss dashed, the weighted mean over sites solid, each the mean over folds,
    dotted lines where a stage begins; None when no round recorded a loss."""
    if not any(r.get("loss") is not None or r.get("sites") for r in rows):
        return None

    def draw(ax) -> None:
        x = [r["round"] for r in rows]
        for i, site in enumerate(sites):
            y = [r["sites"].get(site, float("nan")) for r in rows]
            ax.plot(x, y, color=_COLORS[(i + 1) % len(_COLORS)], lw=1.0, ls="--", marker=".", label=_mpl_text(site))
        y = [float("nan") if r.get("loss") is None else r["loss"] for r in rows]
        ax.plot(x, y, color=color, lw=2.0, marker="o", ms=3, label="weighted mean")
        top = ax.get_ylim()[1]
        for prev, r in zip([None, *rows[:-1]], rows):
            if prev is None or r["stage"] != prev["stage"]:
                if prev is not None:
                    ax.axvline(r["round"] - 0.5, color=_REFERENCE, lw=0.8, ls=":")
                ax.text(r["round"] - 0.3, top, _mpl_text(f"stage {r['stage'] + 1}"), fontsize=7, va="top", color="#4d5866")
        ax.set_xticks(x)
        ax.set(xlabel="round", ylabel="training loss", title=_mpl_text(f"{unit}: training loss per round"))
        ax.legend(loc="best", frameon=False)

    return _draw_png(draw, width=4.2, height=2.8)


def saliency_colorbar() -> str:
    """The colour scale of the Grad-CAM overlays (jet, 0 to 1), drawn once for the section."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(4.2, 0.55), dpi=DPI)
        ax = fig.add_axes((0.05, 0.55, 0.9, 0.3))
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap="jet"), cax=ax,
                     orientation="horizontal", label="Grad-CAM weight (0 = no influence, 1 = strongest)")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.04, metadata={"Software": None})
    return png_data_uri(buf.getvalue())
