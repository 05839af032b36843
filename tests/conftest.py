import os
import socket
import subprocess
import time
import urllib.request

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("STAGEWISE_TEST_THREADS", min(2, os.cpu_count() or 1))))

from stagewise.fitting import SilentReporter  # noqa: E402 - after the environment above is set


@pytest.fixture(scope="session")
def digits_manifest(tmp_path_factory):
    """A small real-image cohort: scikit-learn's scanned digits, 3 vs 8, two scans per patient."""
    from stagewise.demo import make_demo_cohort

    return make_demo_cohort(tmp_path_factory.mktemp("digits"), per_class=40)


def small_recipe(manifest, arms, **overrides):
    """A recipe dict for fast tests: 32 px, float32 on CPU, 3 folds."""
    from stagewise.recipe import recipe_from_dict

    data = {
        "name": "test",
        "seed": 0,
        "cohort": {"manifest": str(manifest)},
        "data": {"image_size": 32},
        "protocol": {"folds": 3, "repeats": 1},
        "compute": {"device": "cpu", "precision": "fp32", "channels_last": False},
        "arms": arms,
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe_from_dict(data)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, log_path, seconds: float) -> None:
    """Wait until `url`/health answers 200, at most `seconds`; fail with the server's log
    when it exits or does not answer in time."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the server did not start:\n{open(log_path, errors='replace').read()[-3000:]}")
        time.sleep(0.1)


class StopAfter(SilentReporter):
    """A silent progress reporter that presses Ctrl-C after `n` folds finished in this
    session; `started` counts the folds that began."""

    def __init__(self, n):
        self.n, self.started = n, 0

    def fold_started(self, arm, split, n_epochs):
        self.started += 1

    def fold_done(self, arm, split, metrics, resumed):
        if not resumed:
            self.n -= 1
            if self.n == 0:
                raise KeyboardInterrupt


def stop_process(proc, timeout: float = 15) -> None:
    """Terminate a server a test started; kill it when it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def same_numbers(a, b) -> bool:
    """Equal nested numbers, NaN equal to NaN (undefined metrics such as PPV with no positive
    call are NaN, and NaN != NaN in plain comparison)."""
    import json

    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
