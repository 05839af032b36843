"""How the report writes numbers: one place for rounding, signs, CIs, p-values and missing values.

Every number in the report is a value of metrics.json passed through one of these functions, and
the tests format metrics.json with the same functions to check the page, so a change of style here
changes the whole report (tables, figure legends, checklist lines) at once.
"""

from __future__ import annotations

import math
from typing import Any

MINUS = "\u2212"
DASH = "\u2014"  # shown where a value is missing (not computed, or NaN)


def finite(x: Any) -> bool:
    """True for a real, finite number (not a bool, not None, not NaN or infinity)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_num(x: Any, digits: int = 3) -> str:
    """`0.969`, `−0.007` (a true minus sign); a dash for missing or non-finite values."""
    if not finite(x):
        return DASH
    text = f"{x:.{digits}f}"
    if text.startswith("-"):
        text = text[1:] if float(text) == 0 else MINUS + text[1:]
    return text


def fmt_mean_sd(stats: dict | None, digits: int = 3) -> str:
    """`0.996 ± 0.008` from a summary entry {mean, sd, ...}."""
    if not stats or not finite(stats.get("mean")):
        return DASH
    return f"{fmt_num(stats['mean'], digits)} ± {fmt_num(stats.get('sd'), digits)}"


def fmt_ci(low: Any, high: Any, digits: int = 3) -> str:
    """`[0.925, 0.998]`."""
    if not (finite(low) and finite(high)):
        return DASH
    return f"[{fmt_num(low, digits)}, {fmt_num(high, digits)}]"


def fmt_point_ci(entry: dict | None, digits: int = 3) -> str:
    """`0.969 [0.925, 0.998]` from {point, low, high}."""
    if not entry or not finite(entry.get("point")):
        return DASH
    return f"{fmt_num(entry['point'], digits)} {fmt_ci(entry.get('low'), entry.get('high'), digits)}"


def fmt_p(p: Any) -> str:
    """`< 0.001` below one in a thousand, else three decimals."""
    if not finite(p):
        return DASH
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def fmt_fraction(f: Any) -> str:
    """A label fraction as a percentage: `25 %`, `100 %`, `12.5 %`."""
    if not finite(f):
        return DASH
    return f"{f * 100:.4g} %"


def fmt_setting(v: Any) -> str:
    """A recipe setting as written (numbers in short general form)."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt_setting(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(fmt_setting(x) for x in v)
    return str(v)
