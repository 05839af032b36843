"""The coordinator's Flower SuperLink, with its APIs split between two listeners, and its
ServerApp started without its secret on a command line.

Why: Flower 1.41 serves its Fleet API (what the hospitals' SuperNodes call), its Control API
(register a node key, start a run, list nodes) and its Runtime API (what the ServerApp calls)
on one HTTP port; `--control-api-address` and `--fleet-api-address` are deprecated and no
longer separate them. Whoever reaches that port holding only `ca.pem` could admit a key of
their own and take part. Here Flower's own application (its `create_app`, with the settings
`flower-superlink` parses from the same arguments) is served twice: on 127.0.0.1 at the
control port, every API, for the coordinator's own `flwr` calls and its ServerApp; on the
hospitals' address, the Fleet API alone (`/v1/fleet/...`), anything else answered 404.
Admission stays a decision of whoever runs the coordinator on its computer.

Flower's default ServerApp launcher passes the app's per-run token as `--token` (visible in
`ps` to every user of the computer). The SuperLink runs in Flower's `process` isolation
instead, and this process starts each `flwr-serverapp` with `--token-file` (a file only its
owner can read, removed when the app ends).

Run as `python -m stagewise.federated.superlink_process PUBLIC_HOST PUBLIC_PORT -- ARGS`,
ARGS being `flower-superlink`'s (with `--host 127.0.0.1 --port CONTROL_PORT --isolation
process`); `federated.launch.Coordinator` builds the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PUBLIC_PATHS = ("/v1/fleet/",)
"""What the hospitals' listener serves: the SuperNodes' Fleet API, nothing else."""
NOT_SERVED = "not served on this address"
"""The hospitals' listener's answer to any other path (`federation site --check` looks for it)."""
CONTROL_READY = "stagewise superlink: control API ready"
"""The line the coordinator waits for before it admits the sites' keys."""
READY = "stagewise superlink: ready"
"""The line the coordinator waits for: both listeners accept connections."""
SITES_GATE = "sites-admitted"
"""The file (in the Flower home) the coordinator writes once it admitted the sites' keys: only
then does the hospitals' listener open. A site that connected before its key was admitted
was refused as unknown, and its SuperNode left, to come back a retry later (15 s)."""


def fleet_only(app):
    """`app` for requests to the Fleet API only; every other path (control, runtime, docs)
    is answered 404 without reaching Flower."""

    async def guarded(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(PUBLIC_PATHS):
            await app(scope, receive, send)
            return
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": f"{NOT_SERVED}\n".encode()})
        # other scopes (websocket, lifespan) are not served here

    return guarded


def start_server_apps(address: str, ca: Path | None, folder: Path, alive) -> None:
    """Start a `flwr-serverapp` for every ServerApp task of the SuperLink at `address`, its
    token in a file of `folder` that only this user can read (removed when the app ends)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    from stagewise.federated.site_process import runtime_client

    client = None
    program = str(Path(sys.executable).parent / "flwr-serverapp")
    while alive():
        try:
            client = client or runtime_client(address, root_certificates=ca.read_bytes() if ca else None)
            found = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP.value],
                                                          agentapp_fab_hashes=[]))
        except Exception:  # noqa: BLE001 - the API is starting: ask again
            found = None
        if found is None or not (found.HasField("task") and found.token):
            time.sleep(0.5)
            continue
        token = folder / f"serverapp-{found.task.task_id}.token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(found.token)
        cmd = [program, "--runtime-api-address", address, "--token-file", str(token), "--parent-pid", str(os.getpid())]
        cmd += ["--root-certificates", str(ca)] if ca else ["--insecure"]
        app = subprocess.Popen(cmd)

        def reap(app=app, token=token):
            app.wait()
            token.unlink(missing_ok=True)

        threading.Thread(target=reap, daemon=True).start()


class _Server:
    """A uvicorn server that leaves signals to `serve` (two servers share one process)."""

    def __init__(self, app, **config):
        import uvicorn

        class Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        self.server = Quiet(uvicorn.Config(app, **config))


async def serve_listeners(app, public: tuple[str, int], config, gate: Path) -> None:
    """Serve `app` on the control address (every API) and, once `gate` exists, the Fleet API
    alone on `public`; both stop when either does."""
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler

    common = dict(log_config=get_uvicorn_log_config(console_handler.level), ssl_keyfile=config.ssl_keyfile,
                  ssl_certfile=config.ssl_certfile, access_log=True, workers=1)
    inner = _Server(app, host=config.host, port=config.port, **common).server
    outer = _Server(fleet_only(app), host=public[0], port=public[1], lifespan="off", **common).server
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(inner, "should_exit", True) or setattr(outer, "should_exit", True))
    tasks = [asyncio.create_task(inner.serve())]
    while not inner.started and not tasks[0].done():
        await asyncio.sleep(0.05)
    print(CONTROL_READY, flush=True)
    while not gate.is_file() and not tasks[0].done():  # the sites' keys are admitted first
        await asyncio.sleep(0.05)
    tasks.append(asyncio.create_task(outer.serve()))
    while not outer.started and not tasks[1].done():
        await asyncio.sleep(0.05)
    if inner.started and outer.started:
        print(f"{READY}: hospitals' API (Fleet only) on {public[0]}:{public[1]}; control and runtime APIs on "
              f"{config.host}:{config.port}", flush=True)
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    inner.should_exit = outer.should_exit = True  # one listener gone (a port taken, a signal): both stop
    await asyncio.gather(*tasks, return_exceptions=True)


def run_listeners(app, public: tuple[str, int], config, gate: Path) -> None:
    """`serve_listeners` on the event loop `flower-superlink` itself runs on: uvicorn's choice,
    uvloop where it is installed (stagewise installs it). Why: both listeners share one loop
    of this process's making, and `flower-superlink`, which this process replaces, runs on
    uvloop; on a plain asyncio loop TLS runs in Python (`asyncio.sslproto`)."""
    import uvicorn

    with asyncio.Runner(loop_factory=uvicorn.Config(app=None, loop="auto").get_loop_factory()) as runner:
        runner.run(serve_listeners(app, public, config, gate))


def objects_in_memory(database: str, federation_manager):
    """Flower's SuperLink stores: its link state (admitted nodes, runs, messages) in `database`
    on disk, so that a restarted coordinator knows the hospitals it admitted; the objects
    (the messages' tensors in flight) in memory.

    Why: with both in one SQLite file every 5 MB chunk of every update was written to disk,
    read back and deleted under the SuperLink's one Python thread; a deployed thaw round
    (42 MB to and from each of three sites) waited 30-40 s on it while the sites' own work
    took 2-7 s. An object lives only until its message is delivered, and a restarted
    coordinator starts its rounds again from the last finished round, never from a message
    in flight."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory

    objects = ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)
    return objects, LinkStateFactory(database, federation_manager, objects)


def main(argv: list[str]) -> int:
    public = (argv[0], int(argv[1]))
    sys.argv = ["flower-superlink", *argv[argv.index("--") + 1:]]
    # Flower's own parsing of flower-superlink's arguments and its own application (1.41)
    import importlib

    from flwr.superlink import main as superlink_main

    flower_superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the module, not its function

    config = flower_superlink._parse_superlink_lifespan_config()  # noqa: SLF001 - Flower's own settings
    superlink_main.get_objectstore_linkstate_factories = objects_in_memory  # what `create_app` builds its stores with
    app = superlink_main.create_app(config, flower_superlink.SuperLinkLifespan)
    address = f"{config.host}:{config.port}"
    ca = Path(config.ssl_ca_certfile) if config.ssl_ca_certfile else None
    stop = threading.Event()
    folder = Path(os.environ.get("FLWR_HOME", "."))
    for stale in folder.glob("serverapp-*.token"):  # of a run that a killed coordinator left: expired
        stale.unlink(missing_ok=True)
    threading.Thread(target=start_server_apps, args=(address, ca, folder, lambda: not stop.is_set()),
                     daemon=True).start()
    try:
        run_listeners(app, public, config, folder / SITES_GATE)
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
