"""Prompt polling in a deployed job: the coordinator and each hospital ask for the next
message every fraction of a second, where Flower's deployed components wait 3 s.

Why: Flower 1.41's deployed Grid (`HttpGrid.send_and_receive`) asks the SuperLink for replies
every 3 s, and its SuperNode sleeps 3 s whenever the SuperLink holds no message for it
(`flwr/supernode/start_client_internal.py`). A federated round is one message each way, so a
deployment paid up to 6 s of waiting per round on top of the work, and a SecAgg+ round (four
exchanges) up to 24 s; the simulation's Grid asks every 0.1 s.

- Coordinator: `PromptGrid` wraps the ServerApp's Grid; its `send_and_receive` is Flower's
  (push the messages, pull replies until all arrived or the timeout passed) with a pull every
  `COORDINATOR_POLL` s. It asks the SuperLink's Runtime API on the coordinator's own machine.
- Hospital: `python -m stagewise.federated.polling SECONDS -- FLOWER_SUPERNODE_ARGS...` runs
  Flower's own `flower-supernode` (its parsing, connection, authentication and message
  handling) with its waits capped at SECONDS (`SITE_POLL`): one small HTTPS request to the
  coordinator that often while the site is idle, as Flower's own ServerApp-side agents do
  (0.25 s); its 0.5 s waits for its own ClientApp's reply check its own store every 0.05 s.
  Only that module's waits change; flwr is pinned (pyproject), and
  `tests/unit/federated/test_polling.py` checks that the loop it shortens is still there.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterable

COORDINATOR_POLL = 0.2
"""Seconds between the coordinator's asks for replies (its own machine's SuperLink)."""
SITE_POLL = 0.5
"""Seconds between a hospital's asks for a message while it has none (over the network)."""


class PromptGrid:
    """A Flower Grid whose `send_and_receive` asks for replies every `poll` seconds; every other
    attribute is the wrapped Grid's."""

    def __init__(self, grid, poll: float = COORDINATOR_POLL):
        self.grid, self.poll = grid, poll

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None) -> list:
        """Flower's contract: push `messages`, return the replies that arrived within `timeout`
        seconds (None: wait for all), in the order they arrived."""
        waiting = set(self.grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list = []
        while waiting:
            got = list(self.grid.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll if end is None else max(0.0, min(self.poll, end - time.monotonic())))
        return replies


LOCAL_POLL = 0.05
"""Seconds between a SuperNode's checks of its own store (its ClientApp's reply, an object)."""


def capped_time(cap: float, local: float = LOCAL_POLL) -> types.SimpleNamespace:
    """The `time` module as the SuperNode's loop sees it: its 3 s wait before asking the
    coordinator again capped at `cap` seconds, its 0.5 s waits on its own store (its
    ClientApp's reply, an object still being written) at `local` seconds."""
    capped = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    capped.sleep = lambda seconds: time.sleep(min(float(seconds), cap if float(seconds) > 1.0 else local))
    return capped


PULL_BACKOFF = (0.05, 0.5)
"""A pull of an object still being uploaded is retried after 0.05 s, then twice as long, at
most 0.5 s apart (Flower: 1 s, at most 10 s)."""


def prompt_object_pulls() -> None:
    """Flower's pulls of a message's objects in this process retry promptly. A reply's message
    reaches the SuperLink before its objects have all been uploaded; whoever pulls it then
    (the ServerApp, a SuperNode, a site's process) waited 1 s, then 2 s, 4 s ... for the rest
    (the benchmark job's three folds: 61 s with prompt pulls, 69-92 s without; RESULTS.md).
    The pulls still give up after Flower's 2 hours, not after a number of tries."""
    from flwr.supercore.inflatable import inflatable_utils

    for pull in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        pull.__kwdefaults__.update(initial_backoff=PULL_BACKOFF[0], backoff_cap=PULL_BACKOFF[1],
                                   max_tries_per_object=None)


CONNECT_RETRY = 1.0
"""Seconds at most between a hospital's attempts to reach a coordinator that is not up yet
(Flower backs off to 20 s: a site started first joined up to 20 s after the coordinator opened)."""


def main(argv: list[str]) -> None:
    """Flower's `flower-supernode` with its message loop's waits capped at argv[0] seconds and
    its connection retries at `CONNECT_RETRY` seconds."""
    cap = float(argv[0])
    import flwr.supercore.retry.http_retry as retry
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    loop.time = capped_time(cap)
    retry.MAX_RETRY_DELAY = CONNECT_RETRY  # read by its retry policy's wait generator at each connection
    prompt_object_pulls()
    sys.argv = ["flower-supernode", *argv[argv.index("--") + 1:]]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
