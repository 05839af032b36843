"""How tensors cross the wire between the coordinator and the sites, and the log of what did.

Flower stores and fetches every `Array` of a message as objects of their own (the Array and
its chunks of at most 5 MB), each pulled with its own request, retried while it is still on
its way; a deployed SuperLink authenticates and books each one. Packed, a ResNet-18 state is
fewer than a tenth of the objects (`tests/unit/federated/test_wire.py` counts them), and the
deployment benchmark went from 197 s to 129 s (RESULTS.md). So each `ArrayRecord` of a
message travels packed: one Array per dtype (the record's arrays flattened and concatenated
in order), with the record's layout (names, dtypes, shapes) in a `ConfigRecord` beside it,
and the original record is restored on arrival, value for value, from the same bytes.

`PackingGrid` packs what the coordinator sends and unpacks what comes back; `packing_mod`
(a ClientApp mod) unpacks at the site and packs the site's reply to a packed message. What
the round loop, the strategies and a site's handlers see is the message as it was written.
`unpacked(message)` gives that view to an audit of the packed messages themselves, and
`WireLog` (the deployment's `federation/wire.jsonl`) names a packed record's tensors.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np

from stagewise.errors import StagewiseError

LAYOUT = "stagewise.packing"
"""The ConfigRecord of a packed message: for each packed record R, `R.names`, `R.dtypes` and
`R.shapes` (comma-separated sizes) of its arrays, in their order."""


class WireError(StagewiseError, ValueError):
    """A packed message whose layout does not match its arrays."""


def pack_content(content, cache: dict | None = None):
    """`content` (a RecordDict) with every non-empty ArrayRecord packed, and their layout.
    `cache` (by the record's id) packs a record that several messages share once. Content
    whose ArrayRecords are all empty (a round whose tensors the sites hold) gets an empty
    layout all the same: it tells the site that its reply travels packed."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    if LAYOUT in content or not content.array_records:
        return content
    cache = {} if cache is None else cache
    records, layout = {}, {}
    for name, record in content.items():
        if not isinstance(record, ArrayRecord) or not len(record):
            records[name] = record
            continue
        if id(record) not in cache:
            cache[id(record)] = _pack_record(record)
        records[name], parts = cache[id(record)]
        layout.update({f"{name}.{part}": value for part, value in parts.items()})
    return RecordDict({**records, LAYOUT: ConfigRecord(layout)})


def _pack_record(record):
    """(one Array per dtype, {"names", "dtypes", "shapes"} of the record's arrays in order)."""
    from flwr.app import Array, ArrayRecord

    arrays = [(k, a.numpy()) for k, a in record.items()]
    by_dtype: dict[str, list[np.ndarray]] = {}
    for _, a in arrays:
        by_dtype.setdefault(a.dtype.name, []).append(a.ravel())
    packed = ArrayRecord({d: Array(np.concatenate(parts)) for d, parts in by_dtype.items()})
    return packed, {"names": [k for k, _ in arrays], "dtypes": [a.dtype.name for _, a in arrays],
                    "shapes": [",".join(str(s) for s in a.shape) for _, a in arrays]}


def unpack_content(content):
    """The content `pack_content` packed, each record as it was; unpacked content as it is."""
    from flwr.app import Array, ArrayRecord, RecordDict

    if LAYOUT not in content:
        return content
    layout = content[LAYOUT]
    records = {}
    for name, record in content.items():
        if name == LAYOUT:
            continue
        if f"{name}.names" not in layout:
            records[name] = record
            continue
        out, offsets, flats = {}, {}, {dtype: array.numpy() for dtype, array in record.items()}
        for key, dtype, shape in _layout_of(layout, name):
            if dtype not in flats:
                raise WireError(f"packed record {name!r}: no {dtype} array for {key!r}")
            flat = flats[dtype]
            start = offsets.get(dtype, 0)
            size = math.prod(shape)
            if start + size > flat.size:
                raise WireError(f"packed record {name!r}: {flat.size} {dtype} values, fewer than its layout names "
                                f"(at {key!r}): the sender and this end run different stagewise versions?")
            out[key] = Array(np.array(flat[start:start + size].reshape(shape)))  # a copy, 0-d stays 0-d
            offsets[dtype] = start + size
        for dtype, flat in flats.items():
            if offsets.get(dtype, 0) != flat.size:
                raise WireError(f"packed record {name!r}: {flat.size} {dtype} values, "
                                f"its layout names {offsets.get(dtype, 0)}")
        records[name] = ArrayRecord(out)
    return RecordDict(records)


def _layout_of(layout, name: str) -> list[tuple[str, str, tuple[int, ...]]]:
    names, dtypes, shapes = (list(layout.get(f"{name}.{part}", [])) for part in ("names", "dtypes", "shapes"))
    if not len(names) == len(dtypes) == len(shapes) or len(set(names)) < len(names):
        raise WireError(f"packed record {name!r}: a layout of {len(names)} names, {len(dtypes)} dtypes and "
                        f"{len(shapes)} shapes, or a name twice")
    try:
        out = [(k, str(np.dtype(d).name), tuple(int(s) for s in str(shape).split(",") if s != ""))
               for k, d, shape in zip(names, dtypes, shapes)]
    except (TypeError, ValueError) as err:
        raise WireError(f"packed record {name!r}: unreadable layout ({err})") from None
    if any(size < 0 for _, _, shape in out for size in shape):
        raise WireError(f"packed record {name!r}: unreadable layout (a negative size)")
    return out


def unpacked(message):
    """A message's content as its sender wrote it (an audit's view of a packed message)."""
    return unpack_content(message.content)


class PackingGrid:
    """A Flower Grid whose messages travel packed: it packs what it sends (a record that
    several messages share, as a round's tensors to every site, once) and unpacks the replies."""

    def __init__(self, grid):
        self.grid = grid

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout):
        messages, cache = list(messages), {}
        for m in messages:
            if m.has_content():
                m.content = pack_content(m.content, cache)
        return [_unpacked_copy(m) for m in self.grid.send_and_receive(messages, timeout=timeout)]


def _unpacked_copy(message):
    """A reply as its site wrote it, in a copy: the packed one stays as an audit recorded it.
    A reply that cannot be unpacked is that site's error reply, not the coordinator's crash."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    if message.has_error() or not message.has_content() or LAYOUT not in message.content:
        return message
    try:
        content = unpack_content(message.content)
    except WireError as err:
        return Message(metadata=message.metadata, error=Error(code=ErrorCode.UNKNOWN, reason=f"unreadable reply: {err}"))
    message = copy.copy(message)
    message.content = content
    return message


def packing_mod(msg, context, call_next):
    """A ClientApp mod: a packed message reaches the site's handler unpacked, and the reply
    to it travels packed; an unpacked message (a test's own) passes as it is."""
    was_packed = msg.has_content() and LAYOUT in msg.content
    if was_packed:
        msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if was_packed and not reply.has_error() and reply.has_content():
        reply.content = pack_content(reply.content)
    return reply


class WireLog:
    """Summaries of every message that crosses the wire, one JSON line each: a record of
    tensors by their names and bytes, a config record's bytes values by their length."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, direction: str, message) -> None:
        entry = {"time": round(time.time(), 3), "direction": direction, "type": message.metadata.message_type, "node": int(
            message.metadata.dst_node_id if direction == "down" else message.metadata.src_node_id)}
        if message.has_error():
            entry["error"] = str(message.error.reason)[:200]
        else:
            layout = message.content[LAYOUT] if LAYOUT in message.content else {}
            for name, record in message.content.items():
                if name == LAYOUT:
                    continue
                tensors = hasattr(record, "count_bytes") and hasattr(record, "to_torch_state_dict")
                if tensors:
                    names = list(layout.get(f"{name}.names", record.keys()))
                    entry[name] = {"tensors": names, "bytes": int(record.count_bytes()),
                                   **({"packed": True} if f"{name}.names" in layout else {})}
                else:
                    entry[name] = {k: wire_value(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(entry, default=str) + "\n")


def wire_value(value):
    """A message's config value as a log of the wire writes it: bytes (SecAgg+'s public keys,
    encrypted key shares, masked vectors), alone or in a list, as their length only."""
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, list) and value and all(isinstance(v, bytes) for v in value):
        return {"bytes": sum(len(v) for v in value), "items": len(value)}
    return value
