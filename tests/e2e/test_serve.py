"""`stagewise serve`: the bedside page and its HTTP API.

A tiny study (two probe arms on one frozen tinycnn trunk, 32 px, digits) is exported as one
two-output bundle; the API is tested in process (TestClient) for every endpoint and every
class of bad input, then for real: uvicorn in a subprocess on 127.0.0.1 (the `serve`
command itself), a bounded load test against it, and headless Chromium driving the page.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import dicom_bytes, free_port, small_recipe, stop_process, wait_healthy
from stagewise.cli import app as cli
from stagewise.data.readers import read_image, read_image_bytes
from stagewise.bundle import Bundle, export_bundle
from stagewise.serve import create_app
from stagewise.serve.server import LOOPBACK_NAMES
from stagewise.study import run_study

PROBE = {"kind": "probe", "epochs": 3, "batch_size": 16, "lr": 1e-2}
SECRETS = ("Doe^Jane", "SECRET-ID-4711", "ACC-99887766", "19800101")  # DICOM header values that must not leak
FILE_NAME = "jane-doe-4711-chest.dcm"  # an upload name that must not reach a log
LIMIT_MB = 4


# ------------------------------------------------------------------------------ helpers
def dicom_of(arr: np.ndarray, photometric: str = "MONOCHROME2", window: tuple | None = None,
             frames: int | None = None, pixels: bool = True) -> bytes:
    """A DX DICOM file of uint16 `arr` (H, W) or (F, H, W), with identifying header values."""
    tags = dict(zip(("PatientName", "PatientID", "AccessionNumber", "PatientBirthDate"), SECRETS))
    if window:
        tags["WindowCenter"], tags["WindowWidth"] = window
    if frames:
        tags["NumberOfFrames"] = frames
    if not pixels:  # the header of an image, without its pixel data
        tags |= {"Rows": arr.shape[-2], "Columns": arr.shape[-1], "BitsAllocated": 16, "SamplesPerPixel": 1}
    return dicom_bytes(arr if pixels else None, **tags, StudyDate="20260102",
                       Modality="DX", ViewPosition="PA", PhotometricInterpretation=photometric, BitsStored=12,
                       HighBit=11, PixelRepresentation=0, RescaleSlope=1, RescaleIntercept=0)


def digit_dicom(png: Path, size: int = 256, **kwargs) -> bytes:
    """A digits scan as a 12-bit DICOM radiograph-sized image."""
    from PIL import Image

    img = Image.open(png).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    return dicom_of((np.asarray(img, dtype=np.float64) / 255 * 4095).round().astype(np.uint16), **kwargs)


def multipart(data: bytes, filename: str = FILE_NAME, field: str = "file") -> tuple[bytes, str]:
    boundary = "stagewise-test-boundary-7f3a"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post(url: str, data: bytes, filename: str = FILE_NAME, timeout: float = 30) -> tuple[int, dict]:
    body, ctype = multipart(data, filename)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextlib.contextmanager
def threaded_server(app):
    """uvicorn on 127.0.0.1 in a thread of this process (bounded start, stopped on exit)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the threaded server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def run_dir(digits_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    arms = [{"name": "probe-a", "backbone": "scratch:tinycnn", "stages": [PROBE]},
            {"name": "probe-b", "backbone": "scratch:tinycnn", "head": {"hidden": 8}, "stages": [PROBE]}]
    run_study(small_recipe(digits_manifest, arms, compute={"save_models": True},
                           evaluation={"saliency": 0, "bootstrap": 50, "report": False}), out)
    return out


@pytest.fixture(scope="module")
def bundle_dir(run_dir):
    return export_bundle(run_dir, ["probe-a", "probe-b"], run_dir.parent / "bundle", fold="r0-f0")


@pytest.fixture(scope="module")
def old_bundle(bundle_dir):
    """A bundle as exported before oof.json existed (and before bundle.json named its intensity convention)."""
    old = bundle_dir.parent / "old-bundle"
    shutil.copytree(bundle_dir, old)
    (old / "oof.json").unlink()
    info = json.loads((old / "bundle.json").read_text())
    del info["intensity"], info["integrity"]  # nor recorded its files' digests
    (old / "bundle.json").write_text(json.dumps(info))
    return old


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return Bundle.load(bundle_dir)


@pytest.fixture(scope="module")
def client(bundle):
    from fastapi.testclient import TestClient

    return TestClient(create_app(bundle, max_upload_mb=LIMIT_MB))


@pytest.fixture(scope="module")
def pngs(digits_manifest):
    return sorted((digits_manifest.parent / "images").glob("*.png"))


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    """`stagewise serve` for real: uvicorn in a subprocess on 127.0.0.1, torn down at the end."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "stagewise", "serve", str(bundle_dir), "--port", str(port),
                                 "--max-upload-mb", str(LIMIT_MB)], stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, 60)
        yield {"url": url, "pid": proc.pid, "log": log}
    finally:
        stop_process(proc)


# ------------------------------------------------------------------------------ reading in memory
def test_bytes_reader_equals_path_reader_for_every_format(tmp_path, pngs):
    import nibabel
    from PIL import Image

    rng = np.random.default_rng(0)
    files = {"digit.png": pngs[0].read_bytes(), "scan.dcm": digit_dicom(pngs[1], 64, window=(2000, 3000)),
             "inverted.dcm": digit_dicom(pngs[2], 48, photometric="MONOCHROME1")}
    Image.fromarray((rng.random((40, 30)) * 255).astype(np.uint8)).convert("RGB").save(tmp_path / "c.jpg", quality=90)
    files["c.jpg"] = (tmp_path / "c.jpg").read_bytes()
    Image.fromarray((rng.random((20, 20)) * 4095).astype(np.uint16)).save(tmp_path / "deep.png")  # raw 12-bit values
    files["deep.png"] = (tmp_path / "deep.png").read_bytes()
    nibabel.save(nibabel.Nifti1Image(rng.random((6, 7, 8)).astype(np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    files["v.nii.gz"] = (tmp_path / "v.nii.gz").read_bytes()
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        expected = read_image(path)
        assert np.array_equal(read_image_bytes(data, name), expected), name
        # without a telling name, the content decides (DICOM marker, NIfTI magic, else Pillow)
        assert np.array_equal(read_image_bytes(data, "upload"), expected), name
    no_preamble = files["scan.dcm"][132:]
    assert np.array_equal(read_image_bytes(no_preamble, "upload"), read_image(tmp_path / "scan.dcm"))


# ------------------------------------------------------------------------------ API, in process
def test_health_model_card_and_validation(client, bundle, run_dir):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["engine"] == "onnx" and health["outputs"] == ["probe-a", "probe-b"]
    assert health["max_upload_bytes"] == LIMIT_MB * 2**20
    card = client.get("/model-card").json()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert card["research_use_only"] and "Research use only" in card["warning"]
    assert card["cohort"]["images"] == metrics["cohort"]["images"] == 80
    assert card["cohort"]["prevalence_patients"] == pytest.approx(0.5)
    assert card["stagewise"] and card["bundle_stagewise"] == bundle.info["stagewise"]
    assert card["validation_distribution"] and "outcome" in card["intended_use"]
    assert card["intensity_notice"] is None and "by storable-range-v1: integer pixels" in card["input"]["intensities"]
    for out, task in zip(card["outputs"], bundle.info["tasks"]):
        assert out["threshold"] == task["threshold"] and out["cross_validated"]["auroc"] == task["metrics"]["auroc"]
        ci = out["patient_level_ci"]["bootstrap_ci"]["auroc"]
        assert ci["low"] <= ci["point"] <= ci["high"]
        # the figures of the rule this bundle applies: the out-of-fold scores in oof.json at its threshold
        at = out["at_threshold"]
        assert at == task["at_threshold"] and at["threshold"] == task["threshold"]
        patients = json.loads((bundle.path / "oof.json").read_text())["outputs"][out["output"]]["patients"]
        y, s = np.asarray(patients["label"]), np.asarray(patients["score"])
        decided = s >= task["threshold"]
        assert at["sensitivity"]["point"] == pytest.approx(decided[y == 1].mean())
        assert at["specificity"]["point"] == pytest.approx(1 - decided[y == 0].mean())
        assert at["counts"]["fp"] == int((decided & (y == 0)).sum())
    validation = client.get("/validation").json()
    preds = pd.read_csv(run_dir / "predictions.csv")
    for arm in ("probe-a", "probe-b"):
        rows = preds[preds["arm"] == arm]
        got = validation["outputs"][arm]
        assert sorted(got["probability"]) == pytest.approx(sorted(rows["prob"]), abs=1e-6)
        assert sum(got["label"]) == rows["y"].sum() and len(got["label"]) == len(rows)


def test_bundle_validation_file_holds_no_names_ids_or_paths(bundle_dir, run_dir, pngs):
    text = (bundle_dir / "oof.json").read_text()
    preds = pd.read_csv(run_dir / "predictions.csv")
    assert not any(p.name in text or p.stem in text for p in pngs)
    assert not any(str(pid) in text for pid in preds["patient"].unique())
    assert str(run_dir.parent) not in text and "/" not in text.replace("\\/", "")


def test_predict_equals_stagewise_predict(client, bundle, pngs, tmp_path):
    dcm = tmp_path / "scan.dcm"
    dcm.write_bytes(digit_dicom(pngs[5], window=(2048, 4096)))
    expected = bundle.predict([pngs[0], dcm])  # PyTorch, as `stagewise predict` by default
    for i, path in enumerate([pngs[0], dcm]):
        name = FILE_NAME if path.suffix == ".dcm" else "jane-doe-4711.png"
        r = client.post("/predict", files={"file": (name, path.read_bytes(), "application/octet-stream")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["engine"] == "onnx" and [o["output"] for o in body["outputs"]] == ["probe-a", "probe-b"]
        for o, task in zip(body["outputs"], bundle.info["tasks"]):
            assert o["probability"] == pytest.approx(expected[f"probability:{o['output']}"][i], abs=1e-5)
            assert o["decision"] == bool(expected[f"decision:{o['output']}"][i]) == (o["probability"] >= o["threshold"])
            assert o["threshold"] == task["threshold"]
            assert 0 <= o["validation"]["below"] <= 1 and o["validation"]["n"] == 80


def test_explain_shows_the_network_view_and_heat_maps_and_no_header_values(client, bundle, pngs, tmp_path):
    import base64

    from PIL import Image

    data = digit_dicom(pngs[3], photometric="MONOCHROME1", window=(2048, 4096))
    r = client.post("/explain", files={"file": (FILE_NAME, data, "application/dicom")})
    assert r.status_code == 200, r.text
    body = r.json()
    (tmp_path / "x.dcm").write_bytes(data)
    seen = bundle.read(tmp_path / "x.dcm")[0].numpy()
    view = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["network_view"].split(",", 1)[1]))))
    assert view.shape == seen.shape == (32, 32)
    assert np.abs(view / 255 - seen).max() <= 0.5 / 255 + 1e-3  # the same pixels, 8-bit rounded
    assert [s["output"] for s in body["saliency"]] == ["probe-a", "probe-b"]
    for s in body["saliency"]:
        cam = Image.open(io.BytesIO(base64.b64decode(s["image"].split(",", 1)[1])))
        assert cam.mode == "RGBA" and cam.size == (32, 32)
    src = body["source"]
    assert src["format"] == "DICOM" and src["modality"] == "DX" and src["view_position"] == "PA"
    assert src["width"] == src["height"] == 256 and any("MONOCHROME1" in n for n in src["notes"])
    assert not any(secret in r.text for secret in SECRETS) and "jane" not in r.text.lower()


BAD = {
    "text file": ("notes.txt", b"patient notes, not an image\n" * 20, 415, "not_an_image"),
    "truncated png": ("scan.png", None, 422, "corrupt_image"),
    "dicom with truncated pixels": ("scan.dcm", None, 422, "corrupt_dicom"),
    "dicom without pixels": ("report.dcm", None, 422, "no_pixel_data"),
    "garbage named dicom": ("scan.dcm", b"\x00" * 128 + b"DICM" + bytes(range(256)) * 8, 422, None),
    "3d volume": ("brain.nii.gz", None, 422, "wrong_kind"),
    "multi-frame dicom": ("series.dcm", None, 422, "wrong_kind"),
    "empty file": ("empty.png", b"", 400, "empty_file"),
    "oversized": ("huge.dcm", b"\x00" * (LIMIT_MB * 2**20 + 1), 413, "too_large"),
}


def _bad_content(kind: str, pngs, tmp_path) -> bytes:
    import nibabel

    good = digit_dicom(pngs[0])
    if kind == "truncated png":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()[:-200]
    if kind == "dicom with truncated pixels":
        return good[: len(good) - 40000]
    if kind == "dicom without pixels":
        return dicom_of(np.zeros((8, 8)), pixels=False)
    if kind == "3d volume":
        nibabel.save(nibabel.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4)), tmp_path / "v.nii.gz")
        return (tmp_path / "v.nii.gz").read_bytes()
    if kind == "multi-frame dicom":
        return dicom_of(np.zeros((3, 16, 16)), frames=3)
    raise KeyError(kind)


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_inputs_get_a_4xx_and_a_plain_message(client, kind, pngs, tmp_path):
    name, data, status, code = BAD[kind]
    data = _bad_content(kind, pngs, tmp_path) if data is None else data
    for endpoint in ("/predict", "/explain"):
        r = client.post(endpoint, files={"file": (name, data, "application/octet-stream")})
        assert r.status_code == status, (kind, r.text)
        body = r.json()
        assert set(body) == {"error", "message"} and (code is None or body["error"] == code), body
        assert "Traceback" not in r.text and "Error:" not in body["message"] and "upload." not in body["message"]
        assert name not in r.text and not any(secret in r.text for secret in SECRETS)


def test_requests_that_are_not_an_upload(client, pngs):
    r = client.post("/predict", json={"file": "x"})
    assert r.status_code == 415 and r.json()["error"] == "not_multipart"
    r = client.post("/predict", files={"image": ("a.png", pngs[0].read_bytes(), "image/png")})
    assert r.status_code == 400 and r.json()["error"] == "missing_file"
    r = client.post("/predict", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code in (400,) and "Traceback" not in r.text


def test_an_upload_without_length_is_cut_off_at_the_limit(client):
    """A chunked upload (no Content-Length) is counted while it arrives and refused at the limit."""
    head, ctype = multipart(b"")
    head = head[: head.index(b"\r\n\r\n") + 4]

    def body():
        yield head
        for _ in range(LIMIT_MB * 4 + 8):  # 256 KiB chunks: twice the limit
            yield b"\x01" * 2**18

    r = client.post("/predict", content=body(), headers={"Content-Type": ctype})
    assert r.status_code == 413 and r.json()["error"] == "too_large"


def test_uploads_are_never_written_to_disk(client, pngs, monkeypatch):
    """A 2 MB DICOM (Starlette would spool anything over 1 MB to a temporary file) is scored
    while every file opened for writing, and every temporary file, is recorded."""
    import tempfile as tf

    written = []
    recording = threading.Event()

    def hook(event, args):
        if recording.is_set() and event == "open" and args and not isinstance(args[0], int):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                written.append(str(args[0]))

    sys.addaudithook(hook)  # audit hooks cannot be removed: this one is inert outside `recording`
    for fn in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tf, fn, lambda *a, **k: pytest.fail("a temporary file was made"))
    data = digit_dicom(pngs[7], size=1024)
    assert len(data) > 2 * 2**20
    recording.set()
    try:
        r = client.post("/explain", files={"file": (FILE_NAME, data, "application/dicom")})
    finally:
        recording.clear()
    assert r.status_code == 200, r.text
    assert written == []


def test_old_bundle_without_validation_distribution(old_bundle, pngs):
    from fastapi.testclient import TestClient

    c = TestClient(create_app(old_bundle))
    body = c.post("/predict", files={"file": ("a.png", pngs[0].read_bytes(), "image/png")}).json()
    assert all(o["validation"] is None for o in body["outputs"])
    card = c.get("/model-card").json()
    assert card["validation_distribution"] is False and card["cohort"] is None
    assert all(o["patient_level_ci"] is None for o in card["outputs"])
    assert c.get("/validation").json() == {"available": False, "outputs": {}}
    assert card["intensity_notice"].startswith("This bundle was made with the earlier intensity convention")
    assert "earlier convention" in card["input"]["intensities"]


def test_page_docs_and_assets_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    texts = [page.text, client.get("/static/app.js").text, client.get("/static/style.css").text]
    for text in texts:  # no CDN, no web fonts: the only URL is the SVG namespace name
        assert "https://" not in text and text.replace("http://www.w3.org/2000/svg", "").count("http://") == 0
    assert '<label for="files"' in page.text and 'type="file"' in page.text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/swagger/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text.lower()
    assert client.get("/swagger/swagger-ui-bundle.js").status_code == 200
    assert client.get("/redoc").status_code == 404
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/explain", "/model-card", "/health"} <= set(spec["paths"])
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"] and body["properties"]["file"]["format"] == "binary"
    assert {"200", "413", "415", "422"} <= set(spec["paths"]["/predict"]["post"]["responses"])


def test_requests_for_another_host_name_are_refused(bundle, pngs):
    from fastapi.testclient import TestClient

    c = TestClient(create_app(bundle, allowed_hosts=LOOPBACK_NAMES))
    assert c.get("/health", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert c.get("/health", headers={"Host": "[::1]:8000"}).status_code == 200
    assert c.get("/health", headers={"Host": "localhost"}).status_code == 200
    r = c.post("/predict", headers={"Host": "rebound.example:8000"},
               files={"file": ("a.png", pngs[0].read_bytes(), "image/png")})
    assert r.status_code == 400 and r.json()["error"] == "bad_host"


def test_serve_command_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    result = CliRunner().invoke(cli, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "not a stagewise bundle" in " ".join(result.output.split())
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------ a real server
def test_real_server_scores_over_http_and_logs_no_names(server, bundle, pngs, tmp_path):
    url = server["url"]
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        assert json.loads(r.read())["engine"] == "onnx"
    data = digit_dicom(pngs[9], window=(2048, 4096))
    (tmp_path / "a.dcm").write_bytes(data)
    expected = bundle.predict([tmp_path / "a.dcm"])
    status, body = post(url + "/predict", data)
    assert status == 200
    for o in body["outputs"]:
        assert o["probability"] == pytest.approx(expected[f"probability:{o['output']}"][0], abs=1e-5)
    status, body = post(url + "/explain", data[: len(data) // 2])
    assert status == 422 and body["error"] == "corrupt_dicom"
    status, body = post(url + "/predict", b"\x00" * (LIMIT_MB * 2**20 + 10))
    assert status == 413 and body["error"] == "too_large"
    with urllib.request.urlopen(url + "/", timeout=5) as r:
        assert b"Choose images" in r.read()
    time.sleep(0.2)
    log = server["log"].read_text()
    assert 'POST /predict HTTP/1.1" 200' in log and 'POST /explain HTTP/1.1" 422' in log
    assert "jane" not in log.lower() and "4711" not in log and "Traceback" not in log
    assert not any(secret in log for secret in SECRETS)


def test_load_200_requests_10_at_a_time(server, pngs, capsys):
    """Bounded: 200 requests, 10 in flight, against the real server on 127.0.0.1."""
    url = server["url"] + "/predict"
    data = digit_dicom(pngs[11], size=512, window=(2048, 4096))

    def one(_):
        t = time.perf_counter()
        status, _ = post(url, data, timeout=60)
        return status, time.perf_counter() - t

    def health_while_busy():  # the event loop is not blocked by scoring: /health answers meanwhile
        waits = []
        for _ in range(10):
            t = time.perf_counter()
            with urllib.request.urlopen(server["url"] + "/health", timeout=10) as r:
                assert r.status == 200
            waits.append(time.perf_counter() - t)
            time.sleep(0.05)
        return max(waits)

    tolerance_mib = 40
    with ThreadPoolExecutor(10) as pool, ThreadPoolExecutor(1) as side:
        first = list(pool.map(one, range(100)))
        rss_first = rss_mib(server["pid"])
        health = side.submit(health_while_busy)
        second = list(pool.map(one, range(100)))
        rss_last = rss_mib(server["pid"])
        slowest_health = health.result(timeout=60)
    results = first + second
    assert [s for s, _ in results] == [200] * 200
    lat = np.array([t for _, t in results]) * 1000
    line = (f"serve load test: 200 requests, 10 concurrent, 512x512 12-bit DICOM: p50 {np.percentile(lat, 50):.1f} ms, "
            f"p95 {np.percentile(lat, 95):.1f} ms; server RSS {rss_first:.0f} MiB after 100, {rss_last:.0f} MiB after "
            f"200 (tolerance +{tolerance_mib} MiB); slowest /health meanwhile {slowest_health * 1000:.0f} ms")
    with capsys.disabled():  # printed in every run, not only on failure
        print("\n" + line)
    assert rss_last - rss_first < tolerance_mib, line
    assert slowest_health < 2.0, line


# ------------------------------------------------------------------------------ a real browser
CHROMIUM = next((p for p in (os.environ.get("STAGEWISE_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
CHROMEDRIVER = os.environ.get("STAGEWISE_CHROMEDRIVER") or shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (module-scoped: requested first, so a skip comes before the server starts)."""
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("no headless Chromium here: the browser test needs chromium and chromedriver (Debian: apt-get "
                    "install chromium chromium-driver; `bash install.sh` does it where it can)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="stagewise-chromium-")
    options = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def test_browser_page_scores_a_dicom_like_stagewise_predict(browser, server, bundle_dir, pngs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    dcm = tmp_path / "bedside.dcm"
    dcm.write_bytes(digit_dicom(pngs[13], window=(2048, 4096)))
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    result = CliRunner().invoke(cli, ["predict", str(bundle_dir), str(dcm), "--csv", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    expected = pd.read_csv(tmp_path / "p.csv").iloc[0]

    browser.get(server["url"] + "/")
    _wait(browser, lambda d: "Intended use" in d.find_element(By.ID, "card-body").text)
    card = browser.find_element(By.ID, "card-body").get_attribute("textContent")
    assert "At this model's threshold" in card and "Cross-validated models' scores" in card
    for task in Bundle.load(bundle_dir).info["tasks"]:  # the figures at the bundle's threshold, as bundle.json has them
        assert f"{task['at_threshold']['sensitivity']['point']:.3f}" in card
    # the file input is reachable from the keyboard
    body = browser.find_element(By.TAG_NAME, "body")
    reached = []
    for _ in range(6):
        body.send_keys(Keys.TAB) if not reached else browser.switch_to.active_element.send_keys(Keys.TAB)
        reached.append(browser.switch_to.active_element.get_attribute("id"))
        if reached[-1] == "files":
            break
    assert "files" in reached, reached
    browser.find_element(By.ID, "files").send_keys(f"{dcm}\n{junk}")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results > li:not(.pending)")) == 2)

    outputs = browser.find_elements(By.CSS_SELECTOR, "#results > li:first-child .output")
    assert [o.get_attribute("data-output") for o in outputs] == ["probe-a", "probe-b"]
    for o in outputs:
        name = o.get_attribute("data-output")
        p = float(o.get_attribute("data-probability"))
        assert p == pytest.approx(expected[f"probability:{name}"], abs=1e-5)
        assert (o.get_attribute("data-decision") == "true") == bool(expected[f"decision:{name}"])
        shown = o.find_element(By.CSS_SELECTOR, ".prob .value").text
        assert shown == f"{100 * p:.1f} %"
        flagged = bool(expected[f"decision:{name}"])
        assert o.get_attribute("data-state") == ("flagged" if flagged else "below_threshold")
        assert "Not flagged" not in o.text and ("Below the decision threshold" in o.text) != flagged
        assert "cross-validated models' scores" in o.text
    first = browser.find_element(By.CSS_SELECTOR, "#results > li:first-child")
    assert "DICOM" in first.text and "256 × 256 px" in first.text and "bedside.dcm" in first.text
    assert first.find_element(By.CSS_SELECTOR, "img.net").get_attribute("src").startswith("data:image/png")
    cam = first.find_element(By.CSS_SELECTOR, "img.cam")
    assert not cam.is_displayed()
    first.find_element(By.CSS_SELECTOR, ".cam-toggle").send_keys(Keys.SPACE)  # keyboard toggle
    _wait(browser, lambda d: cam.is_displayed(), 5)
    failed = browser.find_element(By.CSS_SELECTOR, "#results > li:nth-child(2)")
    assert "failed" in failed.get_attribute("class") and "not an image" in failed.text
    assert browser.find_element(By.ID, "download").is_enabled()
    assert "Research use only" in browser.find_element(By.TAG_NAME, "header").text
    log = server["log"].read_text()
    assert "bedside" not in log and "notes.txt" not in log


def test_browser_page_says_when_a_bundle_has_no_validation_distribution(browser, old_bundle, pngs):
    from selenium.webdriver.common.by import By

    with threaded_server(create_app(old_bundle)) as url:
        browser.get(url + "/")
        _wait(browser, lambda d: "Intended use" in d.find_element(By.ID, "card-body").text)
        browser.find_element(By.ID, "files").send_keys(str(pngs[0]))
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results > li:not(.pending)")) == 1)
        result = browser.find_element(By.CSS_SELECTOR, "#results > li")
        assert "failed" not in result.get_attribute("class")
        assert result.text.count("Comparison with the cross-validated models' scores is unavailable") == 2  # both outputs


def test_browser_page_states_a_below_threshold_result_neutrally(browser, bundle_dir, pngs, tmp_path, monkeypatch):
    """Below the threshold: a neutral grey box without a reassuring word; at or above it: the
    highlighted flag. The outcome in the recipe's words and time frame; a heat map that is zero
    everywhere: a sentence saying why instead of an empty image."""
    from selenium.webdriver.common.by import By

    from stagewise.serve.scorer import Scorer
    from stagewise.serve.wording import FLAT_MAP

    bundle = Bundle.load(bundle_dir)
    a, b = bundle.info["tasks"]
    a |= {"threshold": 1.0, "outcome_label": "admission to intensive care",
          "outcome_horizon": "within 30 days of the radiograph"}  # probe-a: below its threshold
    b["threshold"] = 0.0  # probe-b: flagged
    monkeypatch.setattr(Scorer, "saliency", lambda self, scored: [np.zeros((32, 32), np.float32)] * 2)
    with threaded_server(create_app(bundle)) as url:
        browser.get(url + "/")
        _wait(browser, lambda d: "Intended use" in d.find_element(By.ID, "card-body").text)
        browser.find_element(By.ID, "files").send_keys(str(pngs[0]))
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results > li:not(.pending)")) == 1)
        result = browser.find_element(By.CSS_SELECTOR, "#results > li")
        browser.save_screenshot(str(tmp_path / "below-threshold.png"))
        below, flagged = result.find_elements(By.CSS_SELECTOR, ".output")
        assert below.get_attribute("data-state") == "below_threshold"
        assert below.find_element(By.TAG_NAME, "h4").text == \
            "Probability of admission to intensive care within 30 days of the radiograph (probe-a)"
        box = below.find_element(By.CSS_SELECTOR, ".decision")
        assert box.text == "Below the decision threshold of 100.0 %" and "below" in box.get_attribute("class")
        r, g, bl = (int(float(x)) for x in box.value_of_css_property("background-color").split("(")[1].split(",")[:3])
        assert max(r, g, bl) - min(r, g, bl) <= 8, (r, g, bl)  # grey: no green (nor any hue)
        assert "flagged" not in box.get_attribute("class") and "Not flagged" not in result.text
        assert flagged.get_attribute("data-state") == "flagged"
        assert flagged.find_element(By.CSS_SELECTOR, ".decision").text.startswith("Flagged: at or above")
        note = result.find_element(By.CSS_SELECTOR, ".cam-note")
        assert note.is_displayed() and note.text == FLAT_MAP
        assert not result.find_element(By.CSS_SELECTOR, ".cam-controls").is_displayed()
        shot = os.environ.get("STAGEWISE_SCREENSHOT_DIR")
        if shot:  # to look at the page: STAGEWISE_SCREENSHOT_DIR=/tmp/shots
            shutil.copy(tmp_path / "below-threshold.png", shot)
