"""Who a coordinator's job hears: the nodes of the sites it admitted and greeted, no other;
and a site that refuses the coordinator's job says so where its operator looks."""

from types import SimpleNamespace

import pytest

from typer.testing import CliRunner

from stagewise.cli import app
from stagewise.federated.rounds import AdmittedGrid


def _message(src=None, dst=None):
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=src, dst_node_id=dst), content={})


class _Grid:
    """Nodes 1, 2 admitted; node 99 registered a key of its own and answers everything."""

    def __init__(self):
        self.sent = []

    def get_node_ids(self):
        return [1, 2, 99]

    def send_and_receive(self, messages, timeout):
        self.sent += [m.metadata.dst_node_id for m in messages]
        return [_message(src=m.metadata.dst_node_id) for m in messages] + [_message(src=99)]


def test_a_node_outside_the_jobs_list_is_never_asked_and_its_replies_are_dropped_and_recorded():
    inner = _Grid()
    grid = AdmittedGrid(inner, {1, 2})
    assert grid.get_node_ids() == [1, 2]
    replies = grid.send_and_receive([_message(dst=n) for n in (1, 2, 99)], timeout=1)
    assert inner.sent == [1, 2]  # the model never goes to node 99
    assert [m.metadata.src_node_id for m in replies] == [1, 2]
    assert grid.take_dropped() == [99] and grid.take_dropped() == []


def test_a_refused_site_is_told_in_words_on_its_screen(tmp_path, monkeypatch):
    import stagewise.federated.launch as launch
    from stagewise.federated.site_process import REFUSED_EXIT, REFUSED_LINE

    reason = "site A refuses the coordinator's job 1234: this site's recipe makes job 5678"
    work = tmp_path / "work"

    def refused_site(site_file, server, ca, key, port, log, wait, on_retry=None):
        log.write_text(f"some Flower lines\n{REFUSED_LINE}{reason}\nmore lines\n")
        return REFUSED_EXIT

    monkeypatch.setattr(launch, "prepare_site", lambda *a: work / "site.json")
    monkeypatch.setattr(launch, "run_site", refused_site)
    work.mkdir()
    for name in ("ca.pem", "A.key"):
        (tmp_path / name).write_text("x")
    result = CliRunner().invoke(app, ["federation", "site", "r.yaml", "--manifest", "m.csv", "--site", "A",
                                      "--server", "127.0.0.1:1", "--ca", str(tmp_path / "ca.pem"),
                                      "--key", str(tmp_path / "A.key"), "--workdir", str(work)])
    assert result.exit_code == 2 and reason in " ".join(result.output.split())


def test_the_hospitals_listener_passes_the_fleet_api_only():
    import asyncio

    from stagewise.federated.superlink_process import fleet_only

    reached = []

    async def flower(scope, receive, send):
        reached.append(scope["path"])

    async def call(path):
        sent = []

        async def send(message):
            sent.append(message)

        await fleet_only(flower)({"type": "http", "path": path}, None, send)
        return sent[0]["status"] if sent else None

    statuses = {p: asyncio.run(call(p)) for p in ("/v1/fleet/pull-messages", "/v1/control/register-node",
                                                   "/v1/runtime/acquire-task", "/docs", "/v1/fleetx")}
    assert reached == ["/v1/fleet/pull-messages"]
    assert statuses == {"/v1/fleet/pull-messages": None, "/v1/control/register-node": 404,
                        "/v1/runtime/acquire-task": 404, "/docs": 404, "/v1/fleetx": 404}



def test_the_hospitals_listener_opens_only_once_the_sites_are_admitted(tmp_path):
    """The SuperLink process's two listeners, in a process of their own: before the gate
    file the control listener answers and the hospitals' refuses connections (a SuperNode
    tries again); once the coordinator has written it, both answer, on uvloop's event loop
    (uvicorn's own choice, whose TLS is not Python's)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from stagewise.federated.superlink_process import CONTROL_READY, READY, SITES_GATE

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    program = f"""
import asyncio, pathlib, types
from stagewise.federated.superlink_process import run_listeners
async def app(scope, receive, send):
    if scope["type"] == "http":
        loop = type(asyncio.get_running_loop())
        await send({{"type": "http.response.start", "status": 200, "headers": []}})
        await send({{"type": "http.response.body", "body": f"{{loop.__module__}}.{{loop.__name__}}".encode()}})
config = types.SimpleNamespace(host="127.0.0.1", port={ports[0]}, ssl_keyfile=None, ssl_certfile=None)
run_listeners(app, ("127.0.0.1", {ports[1]}), config, pathlib.Path({str(tmp_path / SITES_GATE)!r}))
"""
    log = tmp_path / "listeners.log"
    process = subprocess.Popen([sys.executable, "-c", program], stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def accepts(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def wait_for(line: str) -> None:
        deadline = time.monotonic() + 60
        while line not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert line in log.read_text(), log.read_text()[-2000:]

    try:
        wait_for(CONTROL_READY)
        time.sleep(0.3)
        assert accepts(ports[0]) and not accepts(ports[1])  # the sites' keys are not admitted yet
        (tmp_path / SITES_GATE).touch()
        wait_for(READY)
        assert accepts(ports[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v1/fleet/x", timeout=10) as answer:
            assert answer.read().decode() == "uvloop.Loop"
    finally:
        process.terminate()
        process.wait(20)


def test_a_round_drops_and_records_a_reply_from_a_node_outside_the_job(monkeypatch):
    """The round loop over a grid where node 99 (a key the coordinator never listed) pushes an
    update too: it is never sent the model, its update is not averaged, the round says so."""
    import torch
    from flwr.app import ArrayRecord, MetricRecord

    import stagewise.federated.rounds as rounds
    from stagewise.models import Network, create_backbone
    from stagewise.recipe import ArmConfig

    arm = ArmConfig.model_validate({"name": "fed", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
                                    "stages": [{"kind": "probe", "epochs": 1, "rounds": 1}]})
    start = Network.build(create_backbone("scratch:tinycnn"), 1)
    head = {k: v for k, v in start.state_dict().items() if k.startswith("head.")}

    def reply(node, value):
        arrays = ArrayRecord(torch_state_dict={k: torch.full_like(v, value) for k, v in head.items()})
        return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False,
                               content={"arrays": arrays, "metrics": MetricRecord({"num-examples": 10, "loss": 0.5})})

    class Strategy:  # sends to every node the grid names; averages what it is given
        def configure_train(self, t, down, config, grid):
            return [_message(dst=n) for n in grid.get_node_ids()]

        def aggregate_train(self, t, replies):
            mean = {k: sum(r.content["arrays"].to_torch_state_dict()[k] for r in replies) / len(replies) for k in head}
            return ArrayRecord(torch_state_dict=mean), MetricRecord({"loss": 0.5})

    class Grid(_Grid):
        def send_and_receive(self, messages, timeout):
            self.sent += [m.metadata.dst_node_id for m in messages]
            return [reply(m.metadata.dst_node_id, 1.0) for m in messages] + [reply(99, 1e6)]

    monkeypatch.setattr(rounds, "make_strategy", lambda cfg, n: Strategy())
    inner = Grid()
    out = rounds.FederatedResult.starting_from(start)
    rounds.serve_rounds(AdmittedGrid(inner, {1, 2}), arm.sites, rounds.round_plan(arm, start.group_names), start,
                        out, 2, order=lambda m: m.metadata.src_node_id)
    (record,) = out.rounds
    assert inner.sent == [1, 2] and record["sites_replied"] == 2
    assert record["dropped_replies_from_nodes"] == [99]
    assert all(torch.equal(out.global_state[k], torch.ones_like(v)) for k, v in head.items())  # 99 not averaged


def test_the_superlink_keeps_admitted_nodes_on_disk_and_tensors_in_flight_in_memory(tmp_path):
    """A restarted coordinator must know the hospitals it admitted (link state in the run
    directory's database); the messages' tensors never touch that file."""
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.superlink.federation import NoOpFederationManager

    from stagewise.federated.superlink_process import objects_in_memory

    db = tmp_path / "superlink.db"
    objects, links = objects_in_memory(str(db), NoOpFederationManager())
    state = links.state()
    assert isinstance(objects.store(), InMemoryObjectStore) and state.object_store is objects.store()
    assert db.is_file() and type(state).__name__.startswith("Sql")


def test_a_site_key_is_admitted_as_the_flower_cli_would_send_it_and_a_wrong_file_is_named(tmp_path):
    """The coordinator admits keys through the Control API itself: a site's OpenSSH public key
    becomes the PEM that Flower's SuperLink reads back to the same key; a file that is not a
    site's public key is refused with its name, before any request."""
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    from stagewise.federated.credentials import make_site_key, public_key_pem

    paths = make_site_key(tmp_path, "hannover")
    ssh = serialization.load_ssh_public_key(paths["pub"].read_bytes())
    assert bytes_to_public_key(public_key_pem(paths["pub"])).public_numbers() == ssh.public_numbers()
    for wrong in (paths["key"], tmp_path / "notes.txt"):  # the private key sent by mistake; any other file
        if not wrong.exists():
            wrong.write_text("not a key\n")
        with pytest.raises(ValueError, match=f"{wrong.name}: not a site's public key"):
            public_key_pem(wrong)


def test_a_reply_without_every_tensor_of_the_round_is_not_averaged(monkeypatch):
    """A site that sends back part of the round's tensors (another stagewise version that does
    not take the starting weights it was not sent) fails the round instead of being half averaged."""
    import torch
    from flwr.app import ArrayRecord, MetricRecord

    import stagewise.federated.rounds as rounds
    from stagewise.federated.job import FederatedError
    from stagewise.models import Network, create_backbone
    from stagewise.recipe import ArmConfig

    arm = ArmConfig.model_validate({"name": "fed", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
                                    "stages": [{"kind": "probe", "epochs": 1, "rounds": 1}]})
    start = Network.build(create_backbone("scratch:tinycnn"), 1)
    head = {k: v for k, v in start.state_dict().items() if k.startswith("head.")}

    def reply(node, keys):
        arrays = ArrayRecord(torch_state_dict={k: torch.zeros_like(head[k]) for k in keys})
        return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False,
                               content={"arrays": arrays, "metrics": MetricRecord({"num-examples": 10, "loss": 0.5})})

    class Strategy:
        def configure_train(self, t, down, config, grid):
            assert set(down.keys()) == set(head)  # the strategy sees every tensor, held ones included
            return [_message(dst=n) for n in grid.get_node_ids()]

        def aggregate_train(self, t, replies):
            raise AssertionError("nothing may be averaged")

    class Grid(_Grid):
        def send_and_receive(self, messages, timeout):
            assert all(len(m.content["arrays"]) == 0 for m in messages)  # the head is still the start: named only
            return [reply(1, head), reply(2, list(head)[:1])]

    monkeypatch.setattr(rounds, "make_strategy", lambda cfg, n: Strategy())
    out = rounds.FederatedResult.starting_from(start)
    with pytest.raises(FederatedError, match=r"1 of 2 sites replied.*site 2 sent 1 tensors, not the round's 2"):
        rounds.serve_rounds(Grid(), arm.sites, rounds.round_plan(arm, start.group_names), start, out, 2,
                            order=lambda m: m.metadata.src_node_id)
