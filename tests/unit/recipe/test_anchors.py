"""The one rule for YAML anchors in a recipe (docs/concepts.md, docs/recipe-reference.md):
top-level `x-` keys are ignored and hold the anchors; an `x-` key anywhere else is an error."""

from pathlib import Path

import pytest
import yaml
from stagewise.recipe import RecipeError, recipe_from_dict

EXAMPLES = sorted((Path(__file__).parents[3] / "examples").glob("*.yaml"))

RECIPE = """
name: anchors
cohort: {manifest: cohort.csv}
x-probe: &probe {kind: probe, epochs: 2}
arms:
  - {name: a, backbone: scratch:resnet18, stages: [*probe]}
  - {name: b, backbone: scratch:resnet18, stages: [*probe, {kind: finetune, epochs: 1}]}
"""


def test_top_level_x_keys_are_ignored_and_their_anchors_repeat():
    recipe = recipe_from_dict(yaml.safe_load(RECIPE))
    assert [[s.kind for s in a.stages] for a in recipe.arms] == [["probe"], ["probe", "finetune"]]
    assert recipe.arms[0].stages[0].epochs == 2


def test_an_x_key_inside_a_section_is_an_unknown_field():
    data = yaml.safe_load(RECIPE)
    data["arms"][0]["x-note"] = "here"
    with pytest.raises(RecipeError, match=r"arms\.0\.x-note \(arm 'a'\): unknown field"):
        recipe_from_dict(data)


def _anchors(text: str) -> list[tuple[int, str | None]]:
    """(depth, top-level key) of every anchored node: depth 1 is the value of a top-level key.
    PyYAML's composed nodes forget their anchors, so this walks the parser's events."""
    stack, found = [], []  # stack: [is_mapping, expecting_key, key]
    for ev in yaml.parse(text):
        if isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            stack.pop()
            if stack and stack[-1][0]:
                stack[-1][1] = True
            continue
        if not isinstance(ev, yaml.NodeEvent):
            continue
        parent = stack[-1] if stack else None
        if parent and parent[0] and parent[1]:
            parent[1], parent[2] = False, getattr(ev, "value", None)
            continue
        if ev.anchor and not isinstance(ev, yaml.AliasEvent):
            found.append((len(stack), stack[0][2] if stack else None))
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append([isinstance(ev, yaml.MappingStartEvent), True, None])
        elif parent and parent[0]:
            parent[1] = True
    return found


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_defines_its_anchors_in_top_level_x_keys(example):
    anchors = _anchors(example.read_text())
    assert all(str(key).startswith("x-") for _, key in anchors), anchors


def test_the_anchor_walk_sees_an_anchor_inside_an_arm():
    assert _anchors(RECIPE) == [(1, "x-probe")]
    assert _anchors("arms:\n  - stages:\n      - &p {kind: probe}\n") == [(4, "arms")]
    assert _anchors("x-a: &a\n  augment: &aug {flip: true}\n") == [(1, "x-a"), (2, "x-a")]
