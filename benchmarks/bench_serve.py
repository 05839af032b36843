"""`stagewise serve` latency: one image at a time, and under load, against the real server.

    python benchmarks/bench_serve.py                   # builds a ResNet-18 224 px bundle (random init)
    python benchmarks/bench_serve.py --bundle PATH     # an existing bundle instead
    python benchmarks/bench_serve.py --quick           # a seconds-long smoke run

The bundle is made by a small study on scikit-learn's digits at 224 px: a probe on a frozen,
randomly initialised `scratch:resnet18` (no weights can be downloaded here, and latency does
not depend on weight values). Requests carry a synthetic 12-bit DICOM of radiograph size
(2048 x 2500 px, 10 MB) or a 256 px PNG; the server is `stagewise serve` in a subprocess on
127.0.0.1 (uvicorn, ONNX Runtime, 2 files scored at a time), the client a thread pool in this
process. Latency is client-side wall time per request, upload and JSON included.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' small-study recipe and DICOM writer


def machine() -> str:
    import onnxruntime
    import torch

    from stagewise.training.autotune import cpu_model

    cpu = cpu_model()
    return (f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"python {platform.python_version()}")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except OSError:
        return "load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg())


_TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds all processes have used (from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / _TICK  # all but idle and iowait


def process_seconds(pid: int | None = None) -> float:
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class Others:
    """The average CPU that processes other than this one and the server used meanwhile."""

    def __init__(self, server_pid: int | None = None):
        self.pid = server_pid
        self.t, self.busy, self.own = time.perf_counter(), busy_seconds(), self._own()

    def _own(self) -> float:
        return process_seconds() + (process_seconds(self.pid) if self.pid else 0.0)

    def __str__(self) -> str:
        wall = time.perf_counter() - self.t
        other = (busy_seconds() - self.busy) - (self._own() - self.own)
        return f"other processes {max(0.0, other) / wall:.2f} CPUs"


def wait_idle(limit_s: float = 600, window_s: float = 3, threshold: float = 0.15) -> str:
    """Wait (at most limit_s) until other processes use under `threshold` CPUs for a window."""
    start = time.perf_counter()
    while True:
        probe = Others()
        time.sleep(window_s)
        used = float(str(probe).split()[2])
        if used < threshold:
            return f"idle after {time.perf_counter() - start:.0f} s"
        if time.perf_counter() - start > limit_s:
            return f"NOT idle after {limit_s:.0f} s (other processes {used:.2f} CPUs): figures inflated"


def make_bundle(folder: Path, size: int, quick: bool) -> Path:
    from conftest import small_recipe

    from stagewise.study.demo import make_demo_cohort
    from stagewise.bundle.export import export_bundle
    from stagewise.study import run_study

    manifest = make_demo_cohort(folder / "digits", per_class=10 if quick else 20)
    arms = [{"name": "probe", "backbone": "scratch:resnet18",
             "stages": [{"kind": "probe", "epochs": 1, "batch_size": 16, "lr": 1e-3}]}]
    recipe = small_recipe(manifest, arms, data={"image_size": size}, compute={"save_models": True},
                          evaluation={"saliency": 0, "bootstrap": 0, "report": False})
    run_study(recipe, folder / "run")
    return export_bundle(folder / "run", "probe", folder / "bundle", fold="r0-f0")


def radiograph_dicom(rows: int, cols: int) -> bytes:
    """A smooth synthetic 12-bit chest-radiograph-sized DICOM with a window (the tests' writer)."""
    from test_serve import dicom_bytes

    y, x = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    img = 2000 + 1200 * np.sin(9 * x) * np.cos(7 * y) + np.random.default_rng(0).normal(0, 40, (rows, cols))
    return dicom_bytes(np.clip(img, 0, 4095).astype(np.uint16), window=(2048, 3000))


def png_bytes(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((side, side)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def post(url: str, data: bytes, name: str) -> float:
    boundary = "bench-boundary-91c2"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\r\n").encode() \
        + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    t = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as r:
        json.loads(r.read())
        assert r.status == 200
    return time.perf_counter() - t


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stats(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):7.1f} ms  p95 {np.percentile(ms, 95):7.1f} ms  (n={len(ms)})"


def in_process(bundle_dir: Path, data: bytes, runs: int) -> None:
    """Where a request's time goes, without HTTP: reading, scoring (ONNX vs PyTorch), Grad-CAM."""
    import torch

    from stagewise.bundle import Bundle
    from stagewise.serve.scorer import Scorer

    scorer = Scorer(Bundle.load(bundle_dir), "auto")
    scorer.warm_up()

    def timed(fn):
        fn()
        out = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return stats(out)

    scored = scorer.read(data, "upload.dcm")
    print(f"  read + window + resize (DICOM {len(data) / 2**20:.1f} MB)      {timed(lambda: scorer.read(data, 'upload.dcm'))}")
    print(f"  score, ONNX Runtime                        {timed(lambda: scorer.probabilities(scored.tensor))}")
    with torch.no_grad():
        print(f"  score, PyTorch                             {timed(lambda: scorer.bundle.probabilities(scored.tensor, 'torch'))}")
    print(f"  Grad-CAM (PyTorch, 1 output)               {timed(lambda: scorer.saliency(scored))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="an existing bundle (default: build ResNet-18 at --size px)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--make-bundle", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_bundle:
        make_bundle(args.make_bundle, args.size, args.quick)
        return
    if args.quick:
        args.requests = 40
    single_runs = 8 if args.quick else 30

    print("stagewise serve benchmark")
    print("command: python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]))
    print(f"date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    print(f"machine: {machine()}")
    print(f"uptime at start: {uptime()}")
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.bundle:
        bundle_dir = args.bundle
    else:  # in a child process: a study in this one would leave PyTorch slower for the timings below
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make-bundle", str(work), "--size", str(args.size)]
                       + (["--quick"] if args.quick else []), check=True, stdout=subprocess.DEVNULL)
        bundle_dir = work / "bundle"
        print(f"bundle: scratch:resnet18 (random init, probe head), {args.size} px, built in {time.perf_counter() - t:.0f} s")
    info = json.loads((bundle_dir / "bundle.json").read_text())
    print(f"bundle: {info['backbone']}, {info['image_size']} px, outputs {[t['output'] for t in info['tasks']]}")
    dicom = radiograph_dicom(320, 256) if args.quick else radiograph_dicom(2500, 2048)
    png = png_bytes(256)

    print(f"\n== in process (no HTTP), one image at a time; {wait_idle()} ==")
    others = Others()
    in_process(bundle_dir, dicom, 5 if args.quick else 20)
    print(f"  ({others})")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(work / "server.log", "wb") as log:  # the child keeps its own descriptor
        server = subprocess.Popen([sys.executable, "-m", "stagewise", "serve", str(bundle_dir), "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        t = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.perf_counter() - t > 120:
                    raise SystemExit(f"the server did not start; see {work / 'server.log'}")
                time.sleep(0.1)
        print(f"\n== real server (stagewise serve, uvicorn, 127.0.0.1), started in {time.perf_counter() - t:.1f} s; "
              f"{wait_idle()} ==")
        others = Others(server.pid)
        for label, endpoint, data, name in [
            (f"POST /predict, DICOM {len(dicom) / 2**20:.1f} MB", "/predict", dicom, "x.dcm"),
            ("POST /predict, PNG 256 px", "/predict", png, "x.png"),
            (f"POST /explain, DICOM {len(dicom) / 2**20:.1f} MB", "/explain", dicom, "x.dcm"),
        ]:
            post(base + endpoint, data, name)
            times = [post(base + endpoint, data, name) for _ in range(single_runs)]
            print(f"  single image  {label:34s} {stats(times)}")
        print(f"  ({others})")
        print(f"  {wait_idle()}")
        others = Others(server.pid)
        rss0 = rss_mib(server.pid)
        for label, data, name in [(f"DICOM {len(dicom) / 2**20:.1f} MB", dicom, "x.dcm"), ("PNG 256 px", png, "x.png")]:
            t = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                times = list(pool.map(lambda _, d=data, n=name: post(base + "/predict", d, n), range(args.requests)))
            wall = time.perf_counter() - t
            print(f"  under load    POST /predict, {label:19s} {args.requests} requests, {args.concurrency} at a time: "
                  f"{stats(times)}; {args.requests / wall:.1f} requests/s")
        print(f"  ({others}); server RSS {rss0:.0f} MiB before the load, {rss_mib(server.pid):.0f} MiB after")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\nuptime at end: {uptime()}")


if __name__ == "__main__":
    main()
