"""What the bedside page and the API say about a result, in words a clinician reads at a glance.

A probability below the decision threshold is not reassurance: a 29.5 % risk of an ICU stay
stays a 29.5 % risk. Such a result is stated neutrally ("Below the decision threshold"),
never as "not flagged" or in a reassuring colour; only a result at or above the threshold is
highlighted. The outcome is named in the recipe's clinical words and time frame when the
bundle carries them (`cohort.outcome_label`, `cohort.outcome_horizon`), its column otherwise.
A heat map that cannot be drawn is replaced by a sentence saying why, never an empty image.
"""

from __future__ import annotations

import numpy as np

from stagewise.recipe import task_outcome

FLAGGED, BELOW = "flagged", "below_threshold"
"""An output's `state`: at or above its decision threshold, or below it."""

NO_SPATIAL_MAP = "No heat map for this network (it is drawn for 2D networks with a spatial last layer only)."
FLAT_MAP = ("No heat map for this image: Grad-CAM found no region that raised this score more than any other (its map "
            "is zero everywhere), so there is nothing to draw.")


def _pct(p: float) -> str:
    return f"{100 * p:.1f} %"


def output_wording(task: dict, out: dict) -> dict:
    """The words of one scored output (`Scorer.outputs`): the outcome as people read it, the
    result's state and the sentence the page shows for it."""
    threshold = _pct(out["threshold"])
    if out["decision"]:
        state, statement = FLAGGED, f"Flagged: at or above the decision threshold of {threshold}"
    else:
        state, statement = BELOW, f"Below the decision threshold of {threshold}"
    return {"outcome_label": task.get("outcome_label"), "outcome_horizon": task.get("outcome_horizon"),
            "outcome_text": task_outcome(task), "state": state, "statement": statement}


def drawable(cam: np.ndarray | None) -> bool:
    """Whether a Grad-CAM map shows anything: not None, and above zero somewhere."""
    return cam is not None and bool(np.any(np.nan_to_num(cam) > 0))


def heatmap_note(cam: np.ndarray | None) -> str | None:
    """Why an output has no heat map (None when it has one)."""
    if cam is None:
        return NO_SPATIAL_MAP
    return None if drawable(cam) else FLAT_MAP


def overall_note(maps: list[np.ndarray | None]) -> str | None:
    """The note for a result none of whose outputs has a heat map (None when one has)."""
    if any(drawable(m) for m in maps):
        return None
    return NO_SPATIAL_MAP if all(m is None for m in maps) else FLAT_MAP
