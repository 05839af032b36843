"""What every recipe module shares: the strict pydantic base model, the recipe's error and
the formatting of pydantic's validation errors into a message that names the field."""

from __future__ import annotations

import types
from typing import Annotated, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from stagewise.errors import StagewiseError
from stagewise.text import did_you_mean


PositiveFloat = Annotated[float, Field(gt=0)]


class RecipeError(StagewiseError, ValueError):
    """A recipe that cannot be run; the message names the file and the field."""


class StrictModel(BaseModel):
    # extra="forbid": a misspelled key is an error, not a silently ignored setting.
    # use_attribute_docstrings: a field's docstring is its description (recipe/reference.py).
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def _unwrap(ann) -> list:
    """The types a field's annotation may hold: Annotated, Optional and unions opened."""
    if get_origin(ann) is Annotated:
        return _unwrap(get_args(ann)[0])
    if get_origin(ann) in (Union, types.UnionType):
        return [t for a in get_args(ann) for t in _unwrap(a)]
    return [ann]


def fields_at(root: type, loc: tuple) -> list[str]:
    """The field names of the model(s) that hold the last key of an error path `loc`
    (pydantic's, stage kind tags included), for a did-you-mean; empty where none is found."""
    current = [root]
    for part in loc[:-1]:
        following = []
        for t in (t for c in current for t in _unwrap(c)):
            if isinstance(part, int) and get_origin(t) in (list, tuple):
                following.append(get_args(t)[0])
            elif isinstance(t, type) and issubclass(t, BaseModel) and isinstance(part, str):
                if part in t.model_fields:
                    following.append(t.model_fields[part].annotation)
                elif "kind" in t.model_fields and t.model_fields["kind"].default == part:  # a stage kind's tag
                    following.append(t)
        current = following
    models = [t for c in current for t in _unwrap(c) if isinstance(t, type) and issubclass(t, BaseModel)]
    return sorted({name for m in models for name in m.model_fields})


def _arm_name(data, loc: list) -> str | None:
    """The name the recipe gives arm `loc[1]` when `loc` points into `arms` (None otherwise)."""
    if len(loc) < 2 or loc[0] != "arms" or not isinstance(loc[1], int) or not isinstance(data, dict):
        return None
    arms = data.get("arms")
    arm = arms[loc[1]] if isinstance(arms, list) and 0 <= loc[1] < len(arms) else None
    name = arm.get("name") if isinstance(arm, dict) else None
    return name if isinstance(name, str) and name else None


def format_errors(err: ValidationError, source: str, stage_kinds: tuple[str, ...], root: type | None = None,
                  data=None) -> str:
    """`err` as one line per problem, each naming its field (and the arm by its name where the
    recipe `data` gives one); `stage_kinds` are the `kind` tags of the stage classes (pydantic
    puts them into error paths, they are taken out). With `root`, the model validated, an
    unknown field gets a did-you-mean from the fields of its place."""
    lines = [f"{source}: the recipe is not valid:"]
    kinds = set(stage_kinds)
    for e in err.errors():
        full = tuple(e["loc"])
        loc, kind = list(full), None
        for i, part in enumerate(loc):  # pydantic puts the stage kind into the path: take it out
            if part in kinds and (i == 0 or isinstance(loc[i - 1], int)):
                kind = loc.pop(i)
                break
        where = ".".join(str(p) for p in loc) or "(top level)"
        if (arm := _arm_name(data, loc)) is not None:
            where += f" (arm {arm!r})"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            guess = did_you_mean(full[-1], fields_at(root, full)) if root is not None else ""
            msg = (f"unknown field{guess}" if guess else
                   f"unknown field (misspelled{f', or not a field of a {kind} stage' if kind else '?'})")
        elif e["type"] == "union_tag_invalid":
            tag = (e.get("ctx") or {}).get("tag", "")
            msg = f"unknown stage kind {tag!r}{did_you_mean(tag, stage_kinds)}; choose one of {', '.join(stage_kinds)}"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)
