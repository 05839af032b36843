"""Prompt polling: the coordinator's Grid returns replies within a poll of their arrival and
keeps Flower's timeout contract; the SuperNode program is Flower's own with its waits capped."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from types import SimpleNamespace

from stagewise.federated.polling import PromptGrid, capped_time


class SlowSites:
    """A Grid whose replies become available `delays[i]` seconds after the push (as a
    SuperLink's do when the sites answer); counts the pulls."""

    def __init__(self, delays):
        self.delays, self.pulls, self.t0 = delays, 0, None

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.t0
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
                for i, d in enumerate(self.delays) if f"m{i}" in ids and d <= now]

    def get_node_ids(self):
        return [1, 2]


def test_replies_come_back_within_a_poll_of_their_arrival():
    grid = PromptGrid(SlowSites([0.3, 0.6]), poll=0.05)
    t0 = time.monotonic()
    replies = grid.send_and_receive(["a", "b"], timeout=10)
    took = time.monotonic() - t0
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0", "m1"]
    assert 0.6 <= took < 0.6 + 0.5  # Flower's HttpGrid would take 3 s here
    assert grid.get_node_ids() == [1, 2]  # everything else is the wrapped Grid's


def test_the_timeout_returns_what_arrived():
    grid = PromptGrid(SlowSites([0.1, 60.0]), poll=0.05)
    t0 = time.monotonic()
    replies = grid.send_and_receive(["a", "b"], timeout=0.4)
    assert 0.4 <= time.monotonic() - t0 < 1.0
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]


def test_the_supernode_loop_it_shortens_is_still_flowers():
    """flwr is pinned; this fails when an upgrade changes the wait the site program caps."""
    import flwr.supernode.start_client_internal as loop

    assert "time.sleep(3)" in inspect.getsource(loop.start_client_internal)
    assert "time.sleep(0.5)" in inspect.getsource(loop._push_messages)  # its wait for its ClientApp's reply
    import flwr.supercore.retry.http_retry as retry  # its connection retries' longest wait, read at each retry

    assert "exponential(max_delay=MAX_RETRY_DELAY)" in inspect.getsource(retry) and retry.MAX_RETRY_DELAY == 20
    capped = capped_time(0.3, local=0.01)
    t0 = time.monotonic()
    capped.sleep(3)
    assert 0.3 <= time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    capped.sleep(0.5)
    assert time.monotonic() - t0 < 0.2
    assert capped.monotonic is time.monotonic and capped.time is time.time


def test_the_site_program_is_flowers_supernode():
    """Its arguments after `--` reach Flower's own parser (here: its help)."""
    out = subprocess.run([sys.executable, "-m", "stagewise.federated.polling", "0.5", "--", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--superlink" in out.stdout and "--isolation" in out.stdout


def test_an_object_still_uploading_is_pulled_again_promptly():
    """A reply's objects may still be on their way when it is pulled: Flower asks again after
    1 s, 2 s, 4 s ...; a deployment's processes ask again after 0.05 s, 0.1 s ... at most 0.5 s."""
    from flwr.supercore.inflatable import inflatable_utils as utils

    from stagewise.federated.polling import prompt_object_pulls

    def arrives_on_fourth_ask():
        asked = []

        def pull(object_id):
            asked.append(object_id)
            if len(asked) < 4:
                raise utils.ObjectUnavailableError(object_id)
            return b"content"

        return pull

    saved = {f: dict(f.__kwdefaults__) for f in (utils.pull_objects, utils.pull_and_inflate_object_from_tree)}
    try:
        prompt_object_pulls()
        t0 = time.monotonic()
        assert utils.pull_objects(["a"], arrives_on_fourth_ask()) == {"a": b"content"}
        assert time.monotonic() - t0 < 0.6  # Flower's defaults: at least 0.8 + 1.6 + 3.2 s
        assert utils.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == 0.05
    finally:
        for f, defaults in saved.items():
            f.__kwdefaults__.clear()
            f.__kwdefaults__.update(defaults)
