"""An MLflow server that answers /health but never the API (or that died after the study
started) must not keep a study silent for minutes: every tracking request waits a short
while, a failure at the start is one clear error before anything is written, and one later
stops only the tracking, says so on screen, and the study finishes. Against a real HTTP
server on 127.0.0.1 that stalls every request but /health."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import small_recipe
from stagewise.errors import RunError
from stagewise.study import run_study
from stagewise.study import tracking
from stagewise.study.tracking import StudyTracker

ARMS = [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1, "batch_size": 16}]}]


@pytest.fixture
def stalled_server():
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            if self.path.rstrip("/") == "/health":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
            else:
                release.wait(600)  # the API never answers

        do_GET = do_POST = do_PATCH = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def short_requests(monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tracking, "HTTP_TIMEOUT_S", 2)


class Screen:
    def __init__(self):
        self.lines = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def message(self, text):
        self.lines.append(text)


def test_a_server_that_never_answers_the_api_stops_the_start_quickly(stalled_server, short_requests, digits_manifest,
                                                                        tmp_path):
    recipe = small_recipe(digits_manifest, ARMS, tracking={"uri": stalled_server})
    t0 = time.monotonic()
    with pytest.raises(RunError, match="MLflow tracking at .* failed"):
        run_study(recipe, tmp_path / "run", reporter=Screen())
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run" / "folds").exists()  # nothing written


def test_a_server_that_stops_answering_mid_study_stops_only_the_tracking(stalled_server, short_requests,
                                                                         digits_manifest, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    def started(self, compute_label, n_threads):  # connected as if the server had answered, then it stalls
        self.client, self.experiment_id, self.study_id = MlflowClient(tracking_uri=self.uri), "1", "0" * 32

    monkeypatch.setattr(StudyTracker, "_start", started)
    recipe = small_recipe(digits_manifest, ARMS, protocol={"folds": 2}, tracking={"uri": stalled_server},
                          evaluation={"saliency": 0, "bootstrap": 0, "report": False})
    screen = Screen()
    t0 = time.monotonic()
    run_study(recipe, tmp_path / "run", reporter=screen)
    assert time.monotonic() - t0 < 90
    assert (tmp_path / "run" / "metrics.json").is_file()  # the study finished
    said = [line for line in screen.lines if "MLflow tracking" in line]
    assert len(said) == 1 and "stopped for this session" in said[0] and "the study goes on" in said[0]
    assert "stopped for this session" in (tmp_path / "run" / "log.txt").read_text()
