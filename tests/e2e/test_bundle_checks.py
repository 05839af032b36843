"""A bundle is checked whole before it scores: its files against the digests recorded at
export, bundle.json against its schema, the heads and the ONNX graph; each damage is one
clear refusal naming the file. Also: `predict --csv` into a path that cannot be written,
Ctrl-C during the ONNX step of an export, and stalled uploads on a real `stagewise serve`.

One tiny study (tinycnn, 32 px, digits) is exported once; each test copies the bundle and
damages its copy.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import free_port, small_recipe, stop_process, wait_healthy
from stagewise.bundle import Bundle, export_bundle
from stagewise.bundle.integrity import BundleError
from stagewise.cli import app
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 1, "batch_size": 16, "lr": 1e-2}


@pytest.fixture(scope="module")
def bundle_dir(digits_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle-checks")
    arms = [{"name": "net", "backbone": "scratch:tinycnn", "stages": [PROBE]}]
    run_study(small_recipe(digits_manifest, arms, compute={"save_models": True},
                           evaluation={"saliency": 0, "bootstrap": 0, "report": False}), root / "run")
    return export_bundle(root / "run", "net", root / "bundle", fold="r0-f0")


@pytest.fixture(scope="module")
def pngs(digits_manifest):
    return sorted((digits_manifest.parent / "images").glob("*.png"))[:3]


def _copy(bundle_dir: Path, tmp_path: Path, old: bool = False) -> Path:
    """A copy of the bundle; `old`: as exported before digests were recorded."""
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    if old:
        info = _info(copy)
        del info["integrity"]
        _write_info(copy, info)
    return copy


def _info(folder: Path) -> dict:
    return json.loads((folder / "bundle.json").read_text())


def _write_info(folder: Path, info: dict) -> None:
    (folder / "bundle.json").write_text(json.dumps(info, indent=2))


def _edit_head_bias(folder: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = folder / "heads.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    bias = next(k for k in state if k.endswith("bias"))
    state[bias] = state[bias] + 3.0
    save_file(state, str(path), metadata=meta)


def _set(key, value):
    def edit(folder: Path) -> None:
        info = _info(folder)
        info[key] = value
        _write_info(folder, info)
    return edit


def _set_task(key, value):
    def edit(folder: Path) -> None:
        info = _info(folder)
        info["tasks"][0][key] = value
        _write_info(folder, info)
    return edit


def _extra_output(folder: Path) -> None:
    info = _info(folder)
    info["tasks"].append({**info["tasks"][0], "output": "net:other", "outcome": "other"})
    _write_info(folder, info)


def _recalibration(folder: Path) -> None:
    _set_task("recalibration", {"intercept": 2.0, "slope": 1.0, "method": "intercept", "fitted_on": {}})(folder)


def _garbage_onnx(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)


def _external_onnx(folder: Path) -> None:
    """model.onnx whose first initializer reads its data from a file outside the bundle."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../outside.bin"
    onnx.save(model, str(folder / "model.onnx"))


# (damage, the file the refusal names, words of the refusal)
CHANGED = {
    "edited head bias": (_edit_head_bias, "heads.safetensors", "differs from the file exported"),
    "image_size changed": (_set("image_size", 48), "bundle.json", "was changed after export"),
    "extra output in tasks": (_extra_output, "bundle.json", "was changed after export"),
    "recalibration entry added": (_recalibration, "bundle.json", "was changed after export"),
    "garbage model.onnx": (_garbage_onnx, "model.onnx", "differs from the file exported"),
    "missing weights": (lambda f: (f / "backbone.safetensors").unlink(), "backbone.safetensors", "is missing"),
}


@pytest.mark.parametrize("damage", list(CHANGED))
def test_a_bundle_changed_after_export_is_refused_naming_the_file(bundle_dir, tmp_path, pngs, damage):
    info = _info(bundle_dir)
    record = info["integrity"]
    assert sorted(record["files"]) == sorted(f.name for f in bundle_dir.iterdir() if f.name != "bundle.json")
    assert all(len(d) == 64 for d in record["files"].values()) and len(record["bundle.json"]) == 64
    copy = _copy(bundle_dir, tmp_path)
    Bundle.load(copy)  # the intact copy loads
    edit, file, words = CHANGED[damage]
    edit(copy)
    with pytest.raises(BundleError) as err:
        Bundle.load(copy)
    assert f"{copy / file}" in str(err.value) and words in str(err.value)
    assert "export it again" in str(err.value)
    result = CliRunner().invoke(app, ["predict", str(copy), *map(str, pngs), "--engine", "onnx"])
    assert result.exit_code == 2 and words in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and "probability:" not in result.output


def _pickle_into(name: str):
    def edit(folder: Path) -> None:
        marker = folder.parent / "pickle-ran"
        (folder / name).write_bytes(pickle.dumps(_Touch(str(marker))))
    return edit


class _Touch:
    """A pickle that creates a file when it is loaded: it must never run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _nan_threshold(folder: Path) -> None:
    info = _info(folder)
    info["tasks"][0]["threshold"] = math.nan
    (folder / "bundle.json").write_text(json.dumps(info))  # json writes NaN


def _truncate(folder: Path) -> None:
    text = (folder / "bundle.json").read_text()
    (folder / "bundle.json").write_text(text[: len(text) // 2])


def _drop(key):
    def edit(folder: Path) -> None:
        info = _info(folder)
        del info[key]
        _write_info(folder, info)
    return edit


# Bundles exported before digests were recorded: what the schema and the content checks refuse.
OLD = {
    "string threshold": (_set_task("threshold", "0.5"), "bundle.json", "tasks.0.threshold"),
    "NaN threshold": (_nan_threshold, "bundle.json", "tasks.0.threshold"),
    "missing tasks": (_drop("tasks"), "bundle.json", "tasks: Field required"),
    "truncated bundle.json": (_truncate, "bundle.json", "is not valid JSON"),
    "negative image_size": (_set("image_size", -32), "bundle.json", "image_size"),
    "image_size not the ONNX input": (_set("image_size", 64), "bundle.json", "is not the size model.onnx takes"),
    "extra output in tasks": (_extra_output, "bundle.json", "do not match the outputs of heads.safetensors"),
    "pickle as heads.safetensors": (_pickle_into("heads.safetensors"), "heads.safetensors", "not a readable bundle weights"),
    "pickle as backbone.safetensors": (_pickle_into("backbone.safetensors"), "backbone.safetensors",
                                       "not a readable bundle weights"),
    "garbage model.onnx": (_garbage_onnx, "model.onnx", "is not a readable ONNX model"),
    "missing weights": (lambda f: (f / "heads.safetensors").unlink(), "heads.safetensors", "is missing"),
    "ONNX external data outside the bundle": (_external_onnx, "model.onnx", "outside the bundle folder"),
}


@pytest.mark.parametrize("damage", list(OLD))
def test_an_older_bundle_loads_with_a_notice_and_its_damage_is_one_clear_message(bundle_dir, tmp_path, pngs, damage):
    copy = _copy(bundle_dir, tmp_path, old=True)
    intact = Bundle.load(copy)
    assert intact.integrity_notice.startswith("this bundle records no digests of its files")
    assert intact.integrity_notice in intact.notices
    edit, file, words = OLD[damage]
    edit(copy)
    with pytest.raises(BundleError) as err:
        Bundle.load(copy)
    assert f"{copy / file}" in str(err.value) and words in str(err.value), str(err.value)
    assert not (tmp_path / "pickle-ran").exists()  # nothing was unpickled
    result = CliRunner().invoke(app, ["predict", str(copy), *map(str, pngs)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "pickle-ran").exists()


def test_predict_says_an_older_bundle_is_unchecked_in_one_line(bundle_dir, tmp_path, pngs):
    copy = _copy(bundle_dir, tmp_path, old=True)
    result = CliRunner().invoke(app, ["predict", str(copy), *map(str, pngs)])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "records no digests" in line]
    assert len(notes) == 1 and notes[0].startswith("note: this bundle records no digests")
    fresh = CliRunner().invoke(app, ["predict", str(bundle_dir), *map(str, pngs)])
    assert fresh.exit_code == 0 and "note:" not in fresh.output


def test_predict_csv_into_an_unwritable_path_is_one_message_before_scoring(bundle_dir, tmp_path, pngs):
    (tmp_path / "a-file").write_text("not a folder")
    target = tmp_path / "a-file" / "scores.csv"
    result = CliRunner().invoke(app, ["predict", str(bundle_dir), *map(str, pngs), "--csv", str(target)])
    assert result.exit_code == 2 and "Traceback" not in result.output and result.exception.__class__ is SystemExit
    assert f"cannot write into {target.parent}" in " ".join(result.output.split())
    assert "probability:" not in result.output  # refused before anything was scored


def test_ctrl_c_during_the_onnx_step_ends_the_export_cleanly(bundle_dir, tmp_path, monkeypatch):
    """SIGINT arriving inside torch.onnx.export is held until the step ends, then interrupts the
    export, whose temporary folder is removed: no abort, no `.partial` left behind."""
    import torch

    from stagewise.bundle import export as export_module

    real, finished = torch.onnx.export, []

    def interrupted_export(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the ONNX step
        real(*args, **kwargs)
        finished.append(True)

    monkeypatch.setattr(torch.onnx, "export", interrupted_export)
    model = Bundle.load(bundle_dir).model
    target = tmp_path / "out" / "bundle"
    target.parent.mkdir()

    def fill(folder: Path) -> None:
        export_module.export_onnx(model, folder / "model.onnx", 32)
        (folder / "bundle.json").write_text("{}")

    with pytest.raises(KeyboardInterrupt):
        export_module.build_bundle(target, fill)
    assert finished == [True]  # the exporter ran to its end before the interrupt was raised
    assert list(target.parent.iterdir()) == []  # neither the bundle nor its `.partial` folder
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------------------ serve: stalled uploads
def test_stalled_partial_uploads_are_dropped_by_a_real_server(bundle_dir, tmp_path, pngs):
    """Uploads that send headers and part of the body, then nothing: each is answered 408 and its
    connection closed after --upload-timeout; connections that stall inside the request line or
    headers are closed after it too; the server keeps answering others."""
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "stagewise", "serve", str(bundle_dir), "--port", str(port),
                                 "--upload-timeout", "1"], stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    stalled = []
    try:
        wait_healthy(url, proc, log, 90)
        boundary = "b0undary"
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
                f"boundary={boundary}\r\nContent-Length: 100000\r\n\r\n--{boundary}\r\nContent-Disposition: form-data; "
                f"name=\"file\"; filename=\"x.png\"\r\n\r\n").encode() + b"\x89PNG" + b"\0" * 1000
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(head)
            stalled.append(s)
        started = time.monotonic()
        for s in stalled:
            answer = b""
            while chunk := s.recv(65536):  # until the server closes the connection
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b'"upload_timeout"' in answer
        assert time.monotonic() - started < 15
        # connections that send part of a request line or of the headers, then nothing: closed, no answer
        for partial in (b"PO", f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode()):
            for _ in range(10):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(partial)
                stalled.append(s)
        started = time.monotonic()
        for s in stalled[20:]:
            assert s.recv(65536) == b""  # closed by the server (a timeout here would raise)
        assert time.monotonic() - started < 10
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"scan.png\"\r\n\r\n"
                ).encode() + pngs[0].read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{url}/predict", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=30) as r:  # the server still scores
            assert r.status == 200 and json.loads(r.read())["outputs"]
    finally:
        for s in stalled:
            s.close()
        stop_process(proc)
