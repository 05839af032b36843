"""What a bundle.json must hold to be scored with, checked before anything is scored.

A pydantic model of the fields `Bundle` reads (types, required keys, a finite threshold in
[0, 1], a positive image size, a finite recalibration), strict so that a string "0.5" is an
error rather than a silent conversion; other fields (metrics, card facts, provenance) pass
through. `check_outputs` and `check_onnx` then hold bundle.json against the weights and the
ONNX graph: one task per output of the heads, in their order, and the image size the graph
takes. Every problem is a BundleError naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stagewise.bundle.integrity import BUNDLE_JSON, BundleError

_AGAIN = "export the bundle again from its run (or copy it again from where it was exported)"


class _Loose(BaseModel):
    # strict: "0.5" is not a threshold; extra allowed: bundle.json carries much more than is checked here
    model_config = ConfigDict(strict=True, extra="allow")


class Recalibration(_Loose):
    intercept: float = Field(allow_inf_nan=False)
    slope: float = Field(gt=0, allow_inf_nan=False)


class Task(_Loose):
    output: str = Field(min_length=1)
    arm: str = Field(min_length=1)
    outcome: str
    threshold: float = Field(ge=0, le=1, allow_inf_nan=False)
    recalibration: Recalibration | None = None


class BundleInfo(_Loose):
    stagewise: str
    recipe: str
    backbone: str
    image_size: int = Field(gt=0, le=4096)
    resize: Literal["pad", "crop", "stretch"]
    tasks: list[Task] = Field(min_length=1)


def read_info(folder: Path) -> dict:
    """bundle.json of `folder`, parsed and checked against `BundleInfo`."""
    path = folder / BUNDLE_JSON
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} cannot be read ({err}); {_AGAIN}") from None
    except ValueError as err:
        raise BundleError(f"{path} is not valid JSON ({err}), e.g. truncated by an interrupted copy; {_AGAIN}") from None
    if not isinstance(info, dict):
        raise BundleError(f"{path} does not hold a JSON object; {_AGAIN}")
    try:
        BundleInfo.model_validate(info)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors())
        raise BundleError(f"{path} is not a valid bundle description ({problems}); {_AGAIN}") from None
    outputs = [t["output"] for t in info["tasks"]]
    if len(set(outputs)) != len(outputs):
        raise BundleError(f"{path}: tasks name an output twice ({', '.join(outputs)}); {_AGAIN}")
    return info


def check_outputs(folder: Path, info: dict, heads: dict) -> None:
    """One task per output of the heads, in their order (arm by arm), as the network computes them."""
    columns = [arm for arm, head in heads.items() for _ in range(head.layers[-1].out_features)]
    arms = [t["arm"] for t in info["tasks"]]
    if arms != columns:
        raise BundleError(f"{folder / BUNDLE_JSON}: its tasks ({len(arms)}: {', '.join(arms)}) do not match the outputs "
                          f"of heads.safetensors ({len(columns)}: {', '.join(columns)}); {_AGAIN}")


def check_onnx(folder: Path, info: dict) -> None:
    """model.onnx, when there is one: a readable graph, taking `image_size` images and giving one
    column per task, whose data all lies inside the bundle folder (no external-data path out)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = folder / "model.onnx"
    if not path.is_file():
        return
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and others: a damaged or foreign file
        raise BundleError(f"{path} is not a readable ONNX model ({type(err).__name__}); {_AGAIN}") from None
    root = folder.resolve()
    for tensor in _tensors(model.graph):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            target = (root / location).resolve()
            if not location or Path(location).is_absolute() or not target.is_relative_to(root):
                raise BundleError(f"{path} reads tensor data from {location!r}, outside the bundle folder; a bundle's "
                                  f"model reads nothing outside it: {_AGAIN}")
    graph_in = model.graph.input
    dims = [d.dim_value for d in graph_in[0].type.tensor_type.shape.dim[2:]] if graph_in else []
    size = info["image_size"]
    if not dims or any(d != size for d in dims):
        raise BundleError(f"{folder / BUNDLE_JSON}: image_size {size} is not the size model.onnx takes "
                          f"({' x '.join(map(str, dims)) or 'unknown'}); {_AGAIN}")
    out = model.graph.output
    width = out[0].type.tensor_type.shape.dim[1].dim_value if out and len(out[0].type.tensor_type.shape.dim) > 1 else 0
    if width != len(info["tasks"]):
        raise BundleError(f"{folder / BUNDLE_JSON}: its {len(info['tasks'])} tasks do not match the {width} outputs of "
                          f"model.onnx; {_AGAIN}")


def _tensors(graph):
    """Every tensor of an ONNX graph that may point at external data (initializers, attributes, subgraphs)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)
