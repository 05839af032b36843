"""Tensors travel packed (federated/wire.py): restored bit for bit, in far fewer Flower objects."""

from __future__ import annotations

import json

import pytest
import torch

from stagewise.federated.wire import LAYOUT, PackingGrid, WireError, WireLog, pack_content, packing_mod, unpack_content


def _state() -> dict[str, torch.Tensor]:
    """A trained ResNet-18's state (no two tensors alike, as Flower would store alike ones
    once): float32 weights and statistics, int64 BatchNorm counters (0-d)."""
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=1).state_dict()
    return {k: torch.randn(v.shape) if v.is_floating_point() else torch.tensor(i) for i, (k, v) in enumerate(state.items())}


def _content(state):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    return RecordDict({"arrays": ArrayRecord(torch_state_dict=state), "config": ConfigRecord({"stage": 1})})


def _message(content, node=7):
    from flwr.app import Message, MessageType, Metadata

    metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
                        group_id="", created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=metadata)


def test_a_packed_record_restores_every_tensor_bit_for_bit_in_order():
    state = _state()
    packed = pack_content(_content(state))
    assert set(packed["arrays"]) == {"float32", "int64"}  # one array per dtype
    assert list(packed[LAYOUT]["arrays.names"]) == list(state)
    back = unpack_content(packed)
    assert list(back.keys()) == ["arrays", "config"] and dict(back["config"]) == {"stage": 1}
    restored = back["arrays"].to_torch_state_dict()
    assert list(restored) == list(state)
    for k, t in state.items():
        assert restored[k].dtype == t.dtype and restored[k].shape == t.shape and torch.equal(restored[k], t), k
    assert back["arrays"].count_bytes() == _content(state)["arrays"].count_bytes()  # the same bytes as sent


def test_a_packed_message_is_a_tenth_of_the_flower_objects():
    """What made a deployed round slow: each Flower object is a request the SuperLink serves."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    content = _content(_state())
    plain = len(get_all_nested_objects(_message(content)))
    packed = len(get_all_nested_objects(_message(pack_content(content))))
    assert plain > 200 and packed * 10 < plain, (plain, packed)


def test_content_without_tensors_and_unpacked_content_pass_as_they_are():
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    plain = RecordDict({"config": ConfigRecord({"arm": "f"})})
    assert pack_content(plain) is plain
    empty = pack_content(RecordDict({"config": ConfigRecord({"arm": "f"}), "arrays": ArrayRecord()}))
    assert dict(empty[LAYOUT]) == {} and len(empty["arrays"]) == 0  # marked: the reply travels packed
    assert len(unpack_content(empty)["arrays"]) == 0
    content = _content(_state())
    assert unpack_content(content) is content


@pytest.mark.parametrize("damage, says", [
    (lambda layout: layout.__setitem__("arrays.shapes", ["3"] + list(layout["arrays.shapes"])[1:]), "values"),
    (lambda layout: layout.__setitem__("arrays.names", list(layout["arrays.names"])[:-1]), "a layout of"),
    (lambda layout: layout.__setitem__("arrays.dtypes", ["float16"] * len(layout["arrays.dtypes"])), "no float16"),
    (lambda layout: layout.__setitem__("arrays.shapes", ["x"] * len(layout["arrays.shapes"])), "unreadable"),
    (lambda layout: layout.__setitem__("arrays.shapes", ["-1"] + list(layout["arrays.shapes"])[1:]), "negative"),
])
def test_a_layout_that_does_not_match_its_arrays_is_a_clear_error(damage, says):
    packed = pack_content(_content(_state()))
    damage(packed[LAYOUT])
    with pytest.raises(WireError, match=says) as err:
        unpack_content(packed)
    assert "'arrays'" in str(err.value)


class _Loopback:
    """A Grid whose sites answer with what they were sent, through a ClientApp's packing mod."""

    def __init__(self, handler):
        self.handler, self.sent = handler, []

    def get_node_ids(self):
        return [7, 8]

    def send_and_receive(self, messages, timeout):
        self.sent = list(messages)
        return [packing_mod(_message(m.content, node=m.metadata.src_node_id), None, self.handler) for m in self.sent]


def test_the_grid_and_the_mod_pack_both_ways_and_their_users_see_tensors_by_name():
    from flwr.app import RecordDict

    state = _state()
    seen_at_site = []

    def handler(msg, context):
        seen_at_site.append(msg.content)
        return _message(RecordDict({"arrays": msg.content["arrays"]}), node=msg.metadata.src_node_id)

    loop = _Loopback(handler)
    down = _content(state)  # one record for both sites, as a strategy's configure_train sends it
    replies = PackingGrid(loop).send_and_receive([_message(down, node) for node in (7, 8)], timeout=1)
    assert all(LAYOUT in m.content for m in loop.sent)
    assert loop.sent[0].content["arrays"] is loop.sent[1].content["arrays"]  # the shared record packed once
    assert all(set(c["arrays"]) == set(state) for c in seen_at_site)  # the site's handler: tensors by name
    for reply in replies:
        assert LAYOUT not in reply.content
        got = reply.content["arrays"].to_torch_state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items())


def test_the_wire_log_names_the_tensors_of_a_packed_record(tmp_path):
    state = _state()
    log = WireLog(tmp_path / "wire.jsonl")
    log("up", _message(pack_content(_content(state))))
    (entry,) = [json.loads(line) for line in (tmp_path / "wire.jsonl").read_text().splitlines()]
    assert entry["arrays"]["tensors"] == list(state) and entry["arrays"]["packed"] is True
    assert entry["arrays"]["bytes"] > sum(t.numel() * t.element_size() for t in state.values()) * 0.99
    assert LAYOUT not in entry and entry["config"] == {"stage": 1}


def test_a_reply_that_cannot_be_unpacked_is_that_sites_error_not_the_coordinators_crash():
    state = _state()

    class Garbled:
        def get_node_ids(self):
            return [7]

        def send_and_receive(self, messages, timeout):
            reply = pack_content(_content(state))
            reply[LAYOUT]["arrays.shapes"] = ["1"] * len(state)
            return [_message(reply)]

    (reply,) = PackingGrid(Garbled()).send_and_receive([_message(_content(state))], timeout=1)
    assert reply.has_error() and "unreadable reply" in reply.error.reason and "'arrays'" in reply.error.reason
    assert reply.metadata.src_node_id == 7  # the round records which site it was
