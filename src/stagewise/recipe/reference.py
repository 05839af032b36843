"""The reference of every recipe field, generated from the pydantic models themselves, so that
it cannot drift from what `stagewise validate` accepts: each field's section path, type and
allowed values, default and meaning (the field's docstring, which `StrictModel` makes its
description). `tests/unit/recipe/test_reference.py` fails when docs/recipe-reference.md
differs from what this module writes.

Regenerate the file after changing a recipe model:

    python -m stagewise.recipe.reference docs/recipe-reference.md
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from stagewise.io import atomic_write
from stagewise.recipe.study import Recipe

COMMAND = "python -m stagewise.recipe.reference docs/recipe-reference.md"
"""The one command that rewrites the reference (the test's failure message names it)."""

_NAMES = {int: "integer", float: "number", str: "text", bool: "true/false", Path: "path"}
_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


@dataclass
class Section:
    """One table of the reference: the fields of one model at one place in a recipe."""

    path: str
    label: str
    intro: str
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.path} {self.label}".lower()).strip("-")


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _intro(cls: type) -> str:
    """The first paragraph of the class's own docstring (not an inherited one)."""
    doc = cls.__dict__.get("__doc__") or ""
    return _one_line(doc.strip().split("\n\n")[0])


def _bounds(meta: list) -> str:
    parts = []
    for m in meta:
        for attr, sign in _BOUNDS:
            if getattr(m, attr, None) is not None:
                parts.append(f"{sign} {getattr(m, attr):g}")
        if getattr(m, "min_length", None):
            parts.append(f"at least {m.min_length}")
        if getattr(m, "pattern", None):
            parts.append(f"matching `{m.pattern}`")
    return ", ".join(parts)


def _flat_meta(meta) -> list:
    """Constraint objects, with those inside a `Field(...)` of an `Annotated` type unpacked."""
    out = []
    for m in meta:
        out.extend(m.metadata if isinstance(m, FieldInfo) else [m])
    return out


def type_text(ann, meta=(), link=None) -> str:
    """A field's type as a reader writes it in YAML, with its allowed values and bounds, e.g.
    'integer ≥ 2', 'one of `pad`, `crop`, `stretch`', 'list of number > 0, ≤ 1'. `link` names
    a model class's section (a callable giving markdown for it)."""
    meta = _flat_meta(meta)
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return type_text(args[0], [*meta, *args[1:]], link)
    if origin in (Union, types.UnionType):
        parts = [type_text(a, meta, link) for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(parts))
    if origin is Literal:
        values = ", ".join(f"`{_value(v)}`" for v in args)
        return values if len(args) == 1 else f"one of {values}"
    bounds = _bounds(meta)
    if origin is list:
        text = f"list of {type_text(args[0], (), link)}"
    elif origin is tuple:
        text = f"[{', '.join(type_text(a, (), link) for a in args)}]"
    elif origin is dict:
        text = f"map of {type_text(args[0], (), link)} to {type_text(args[1], (), link)}"
    elif isinstance(ann, type) and issubclass(ann, BaseModel):
        text = link(ann) if link else ann.__name__
    else:
        text = _NAMES.get(ann, getattr(ann, "__name__", str(ann)))
    if bounds and origin in (list, dict, tuple):
        return f"{text} ({bounds})"
    return f"{text} {bounds}" if bounds else text


def _value(v) -> str:
    """A value as YAML writes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "its fields' defaults"
    return f"`{_value(value)}`"


def _models_in(ann) -> list[type]:
    """The pydantic model classes a field's type holds (through lists, unions, Annotated)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in get_args(ann) for m in _models_in(a)]


def _is_list(ann) -> bool:
    origin = get_origin(ann)
    if origin in (Union, types.UnionType):
        return any(_is_list(a) for a in get_args(ann))
    return origin is list


def _common_base(classes: list[type]) -> type:
    return next(b for b in classes[0].__mro__ if all(issubclass(c, b) for c in classes))


def _discriminator(classes: list[type]) -> str | None:
    """The field whose single literal value tells the union's classes apart (`kind`)."""
    names = set.intersection(*(set(c.model_fields) for c in classes))
    for name in sorted(names):
        tags = [get_args(c.model_fields[name].annotation) for c in classes]
        if all(get_origin(c.model_fields[name].annotation) is Literal for c in classes) \
                and all(len(t) == 1 for t in tags) and len(set(tags)) == len(classes):
            return name
    return None


class _Builder:
    """Walks the models depth-first in declaration order; a model met a second time (CutMix
    and MixUp share one) is linked to its first section instead of repeated."""

    def __init__(self):
        self.sections: list[Section] = []
        self.first: dict[type, Section] = {}
        self.planned: dict[type, str] = {}
        self.missing: list[str] = []

    def link(self, path: str):
        def text(cls: type) -> str:
            target = self.first.get(cls) or Section(self.planned.get(cls, path), "", "")
            return f"section [`{target.path}`](#{target.anchor})"
        return text

    def row(self, path: str, name: str, info: FieldInfo, child: str) -> tuple[str, str, str, str]:
        if not _one_line(info.description):
            self.missing.append(f"{path}.{name}" if path else name)
        kind = type_text(info.annotation, info.metadata, self.link(child))
        return (f"`{child}`", kind, default_text(info), _one_line(info.description))

    def model(self, cls: type, path: str, label: str = "", names: list[str] | None = None,
              extra_rows: list | None = None) -> None:
        section = Section(path or "top level", label, _intro(cls))
        self.first.setdefault(cls, section)
        self.sections.append(section)
        section.rows.extend(extra_rows or [])
        nested = []
        for name in names if names is not None else list(cls.model_fields):
            info = cls.model_fields[name]
            child = f"{path}.{name}" if path else name
            models = _models_in(info.annotation)
            child_path = child + ("[]" if _is_list(info.annotation) else "")
            seen = [m for m in models if m in self.planned]
            if models and not seen:
                self.planned.update(dict.fromkeys(models, child_path))
                nested.append((models, child_path))
            section.rows.append(self.row(path, name, info, child_path if models and not seen else child))
        for models, child_path in nested:
            if len(models) == 1:
                self.model(models[0], child_path)
            else:
                self.union(models, child_path)

    def union(self, classes: list[type], path: str) -> None:
        """A tagged union (the stage kinds): the fields every class shares, then per class
        the fields it adds or defines differently."""
        base, tag = _common_base(classes), _discriminator(classes)
        values = ", ".join(f"`{c.model_fields[tag].default}`" for c in classes)
        tag_row = (f"`{path}.{tag}`", f"one of {values}", "required", f"Picks the {tag}; the fields below follow from it.")
        shared = [n for n in base.model_fields if n != tag]
        self.model(base, path, f"every {tag}", shared, [tag_row])
        for cls in classes:
            own = [n for n in cls.model_fields if n != tag and (n not in base.model_fields or
                   self.row(path, n, cls.model_fields[n], "") != self.row(path, n, base.model_fields[n], ""))]
            self.model(cls, path, f"{tag} `{cls.model_fields[tag].default}`", own)


HEADER = """# Recipe reference

<!-- Generated from the recipe's models (src/stagewise/recipe/) by `{command}`; do not edit. -->

Every field a recipe (one YAML file, one study) may hold, section by section. A field left
out takes its default; `required` fields have none; `unset` means the field is empty unless
given. A misspelled field is an error, never ignored. Top-level keys starting with `x-` are the
one exception: `stagewise` ignores them, so they can hold YAML anchors that the arms refer to
(`x-thaw: &thaw {{kind: thaw, ...}}`, then `stages: [*thaw]`). `stagewise validate RECIPE`
checks a recipe against exactly these fields; `--set FIELD=VALUE` (e.g. `--set
arms.0.stages.1.epochs=5`) changes one on the command line, a list entry by its index.
"""


def _table(section: Section) -> str:
    heading = f"## `{section.path}`" + (f", {section.label}" if section.label else "")
    lines = [f'<a id="{section.anchor}"></a>', "", heading, ""]
    if section.intro:
        lines += [section.intro, ""]
    if not section.rows:
        return "\n".join([*lines, "No fields of its own.", ""])
    lines += ["| field | type and allowed values | default | meaning |", "| --- | --- | --- | --- |"]
    for row in section.rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def undocumented_fields() -> list[str]:
    """Recipe fields without a docstring (their meaning in the reference would be empty)."""
    builder = _Builder()
    builder.model(Recipe, "")
    return builder.missing


def recipe_reference() -> str:
    """The reference as markdown (docs/recipe-reference.md); refuses fields without a meaning."""
    builder = _Builder()
    builder.model(Recipe, "")
    if builder.missing:
        raise ValueError("these recipe fields have no docstring (one line of meaning under the field, as the "
                         f"others have): {', '.join(builder.missing)}")
    return "\n".join([HEADER.format(command=COMMAND), *(_table(s) for s in builder.sections)])


def main(argv: list[str] | None = None) -> None:
    """`python -m stagewise.recipe.reference [FILE]`: write the reference to FILE, else print it."""
    args = sys.argv[1:] if argv is None else argv
    text = recipe_reference()
    if args:
        atomic_write(Path(args[0]), text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
