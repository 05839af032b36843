"""What every recipe module shares: the strict pydantic base model, the recipe's error and
the formatting of pydantic's validation errors into a message that names the field."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from stagewise.errors import StagewiseError


PositiveFloat = Annotated[float, Field(gt=0)]


class RecipeError(StagewiseError, ValueError):
    """A recipe that cannot be run; the message names the file and the field."""


class StrictModel(BaseModel):
    # extra="forbid": a misspelled key is an error, not a silently ignored setting.
    # use_attribute_docstrings: a field's docstring is its description (recipe/reference.py).
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def format_errors(err: ValidationError, source: str, stage_kinds: tuple[str, ...]) -> str:
    """`err` as one line per problem, each naming its field; `stage_kinds` are the `kind`
    tags of the stage classes (pydantic puts them into error paths, they are taken out)."""
    lines = [f"{source}: the recipe is not valid:"]
    kinds = set(stage_kinds)
    for e in err.errors():
        loc, kind = list(e["loc"]), None
        for i, part in enumerate(loc):  # pydantic puts the stage kind into the path: take it out
            if part in kinds and (i == 0 or isinstance(loc[i - 1], int)):
                kind = loc.pop(i)
                break
        where = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field (misspelled{f', or not a field of a {kind} stage' if kind else '?'})"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown stage kind; choose one of {', '.join(stage_kinds)}"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)
