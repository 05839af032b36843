"""A hospital's site as one long-lived process: Flower's SuperNode, started in its `process`
isolation mode, plus this process running every ClientApp task the SuperNode receives, one
after another, in itself.

Why: by default a SuperNode starts a fresh `flwr-clientapp` process for every message, and
each one imports torch and stagewise again, reads the site's manifest and images again and
rebuilds its frozen prefix: a deployed job ran 7x slower than the same job in the simulation.
Here the imports, the site's loaded images and its `SiteWork` (see `deployment._site_work`,
cached per site file and arm) live for the whole job, as they do in the simulation's actors.

The task loop uses Flower's own Runtime API client and its task input/output functions (the
ones `flwr-clientapp` uses), so a message is pulled, answered and acknowledged exactly as the
per-message process does; only the process boundary goes. The Runtime API listens on
127.0.0.1 (the SuperNode's default), so only this machine can ask it for tasks.

Run as `python -m stagewise.federated.site_process RUNTIME_PORT [MODULE:CLIENTAPP] -- SUPERNODE_COMMAND...`
(`federated.launch.start_site` builds the command); it exits with the SuperNode's exit code.
The ClientApp is the site's choice (default: a training job's, `deployment:client_app`; a
federated evaluation's is `stagewise.external.federated_app:client_app`), loaded by name as
Flower loads an app component, never named by the coordinator.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import subprocess
import sys
import threading
import time

from stagewise.federated.polling import prompt_object_pulls

ISOLATION = ["--isolation", "process"]
DEFAULT_APP = "stagewise.federated.deployment:client_app"
REFUSED_LINE = "stagewise site: refused: "
"""How a refusal of the coordinator's job starts in the site's log (`federation site` shows it)."""
REFUSED_EXIT = 3
"""The exit code of a site that refused the coordinator's job (not retried)."""
LEAVING = threading.Event()
_ONE_AT_A_TIME = threading.Lock()
"""The site's work (training, scoring) runs for one task at a time; only the messaging overlaps."""
"""The SuperNode's flags that leave ClientApp tasks to this process."""


def runtime_client(address: str, token: str | None = None, root_certificates: bytes | None = None):
    """A client of a Runtime API: the SuperNode's (plain, on 127.0.0.1) or, with
    `root_certificates`, the coordinator's SuperLink's (TLS). Flower's own retry policy is not used: on a
    refused token (a task of a run that has since stopped) it interrupts its own process,
    right for a one-message `flwr-clientapp`, fatal for this one. Here a transport error is
    retried for at most a minute and any refusal ends that one task (`run_task`); a client
    that asks for tasks tries once (`serve_tasks` asks again)."""
    import httpx
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import RetryInvoker, exponential
    from flwr.supercore.runtime import RuntimeHttpClient

    component = "flwr-clientapp" if token else "SuperExec"
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    retry = RetryInvoker(lambda: exponential(max_delay=5), httpx.TransportError,
                         max_tries=None if token else 1, max_time=60.0)
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=root_certificates is None,
                                                 root_certificates=root_certificates,
                                                 interceptors=interceptors, retry_invoker=retry)


def _heartbeat(client):
    """The task's heartbeat (the SuperNode gives up on a task that stops sending one). Flower's
    own interrupts the process when the task has expired; this one only reports the failure."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
        except httpx.HTTPError:
            return False

    return beat


def run_task(address: str, token: str, app) -> bool:
    """Pull one task's message, answer it with `app` in this process, push the reply and the
    task's status: what `flwr-clientapp` does, without starting a process. True when the app
    answered; an app that raised sends Flower's error reply (the coordinator records it)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = runtime_client(address, token)
    heartbeat = HeartbeatSender(_heartbeat(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, _run, _fab = pull_task_input(client)
        print(f"{time.strftime('%H:%M:%S')} stagewise site: answering the coordinator's "
              f"{message.metadata.message_type} message", flush=True)
        with _ONE_AT_A_TIME:
            started = time.perf_counter()
            reply = app(message=message, context=context)
        print(f"{time.strftime('%H:%M:%S')} stagewise site: answered in {time.perf_counter() - started:.1f} s",
              flush=True)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - answered as Flower answers it: an error reply
        if getattr(ex, "ends_site", False):  # this site refuses the job: said on its screen, then it leaves
            print(f"{REFUSED_LINE}{ex}", flush=True)
            LEAVING.set()
        else:
            logging.getLogger("stagewise").exception("the site's ClientApp raised")
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, status, details)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    return status == SubStatus.COMPLETED


def _run_task_quietly(address: str, token: str, app) -> None:
    try:
        run_task(address, token, app)
    except Exception:  # noqa: BLE001 - the task's reply or status could not be sent: Flower times it out
        logging.getLogger("stagewise").exception("a ClientApp task could not be completed")


def serve_tasks(address: str, app, alive=lambda: True, poll: float = 0.1) -> None:
    """Answer the SuperNode's ClientApp tasks while `alive()` (their work one at a time); before
    the SuperNode's Runtime API answers, keep asking."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    client = None
    try:
        while alive():
            try:
                client = client or runtime_client(address)
                found = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value],
                                                              agentapp_fab_hashes=[]))
            except Exception:  # noqa: BLE001 - the SuperNode is starting or has gone: `alive` decides
                found = None
            if found is not None and found.HasField("task") and found.token:
                # each task in a thread of its own: one whose message never arrives whole (a run
                # stopped while it was sent) must not keep the next run's messages waiting
                threading.Thread(target=_run_task_quietly, args=(address, found.token, app), daemon=True).start()
            else:
                time.sleep(poll)
    finally:
        if client is not None:
            client.close()


def main(argv: list[str]) -> int:
    """Start the SuperNode command after `--`, answer its tasks until it exits; its exit code."""
    import importlib

    port, command = argv[0], argv[argv.index("--") + 1:]
    component = argv[1] if argv[1] != "--" else DEFAULT_APP
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack into the site's log
    module, _, name = component.partition(":")
    if not module.startswith("stagewise."):
        raise SystemExit(f"{component}: a site runs a stagewise ClientApp only")
    client_app = getattr(importlib.import_module(module), name)
    prompt_object_pulls()  # a message's objects are pulled from the SuperNode as soon as they are in
    supernode = subprocess.Popen(command)  # inherits this process's stdout/stderr (the site's log)
    try:
        serve_tasks(f"127.0.0.1:{port}", client_app, alive=lambda: supernode.poll() is None and not LEAVING.is_set())
        if LEAVING.is_set():
            time.sleep(2.0)  # the error reply reaches the coordinator before this SuperNode leaves
    finally:
        if supernode.poll() is None:
            supernode.terminate()
            supernode.wait(30)
    return REFUSED_EXIT if LEAVING.is_set() else supernode.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
