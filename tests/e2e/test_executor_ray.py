"""The Ray executor on a real two-node Ray cluster on 127.0.0.1 (a head and a second node,
one CPU each, started by this module as separate processes and stopped at its end): the same
numbers as a local run, a killed worker retried, resume without resubmitting, a fit's own
error instead of a Ray traceback, and workers that never touch the run directory."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import StopAfter, same_numbers, small_recipe
from stagewise.study import run_study

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray_of_its_own  # starts Ray itself: the tests' shared instance is stopped first (conftest)

PROBE = {"kind": "probe", "epochs": 3, "batch_size": 16, "lr": 3e-3}
QUIET = {"saliency": 2, "bootstrap": 0, "report": False}

# Loaded by every Python process of the test cluster (PYTHONPATH): records each file event of
# a worker on a path under STAGEWISE_TEST_WATCH (must stay empty) or in a fit's private folder
# (shows that the hook saw the workers' writes).
SITECUSTOMIZE = '''
import os, sys
_watch, _log = os.environ.get("STAGEWISE_TEST_WATCH"), os.environ.get("STAGEWISE_TEST_WATCH_LOG")
if _watch and _log:
    _busy = []
    def _hook(event, args):
        if _busy or event not in ("open", "os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir"):
            return
        for a in args[:2] if event in ("os.rename", "os.replace") else args[:1]:
            try:
                p = os.fsdecode(a)
            except TypeError:
                continue
            if p.startswith(_watch) or "stagewise-fit-" in p:
                _busy.append(1)
                try:
                    with open(_log, "a") as f:
                        f.write(f"{os.getpid()} {event} {p}\\n")
                finally:
                    _busy.clear()
    sys.addaudithook(_hook)
'''


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    """`ray start --block` processes (head + node); stopping them stops their Ray processes."""

    def __init__(self, root: Path):
        self.root = root
        self.crash = root / "crash"
        self.runs = root / "runs"
        self.touched = root / "touched.log"
        for d in (self.crash, self.runs, root / "site"):
            d.mkdir()
        (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.procs = []

    def start(self):
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", STAGEWISE_RAY_TEST_CRASH=str(self.crash),
                   STAGEWISE_TEST_WATCH=str(self.runs), STAGEWISE_TEST_WATCH_LOG=str(self.touched),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(self.root / "site"), os.environ.get("PYTHONPATH")])))
        ports = _free_ports(10)
        self.address = f"127.0.0.1:{ports[0]}"
        common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000",
                  "--disable-usage-stats"]
        head = ["--head", f"--port={ports[0]}", f"--temp-dir={self.root / 'ray'}", "--include-dashboard=false",
                f"--ray-client-server-port={ports[1]}", f"--dashboard-agent-listen-port={ports[2]}",
                f"--dashboard-agent-grpc-port={ports[3]}", f"--runtime-env-agent-port={ports[4]}",
                f"--metrics-export-port={ports[5]}"]
        node = [f"--address={self.address}", f"--dashboard-agent-listen-port={ports[6]}",
                f"--dashboard-agent-grpc-port={ports[7]}", f"--runtime-env-agent-port={ports[8]}",
                f"--metrics-export-port={ports[9]}"]
        for i, args in enumerate((head, node)):
            log = self.root / f"node{i}.log"
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(["ray", "start", *args, *common], env=env, stdout=out,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
            self._wait_until(lambda log=log: "Ray runtime started" in log.read_text(), 120)
        self._wait_until(self._two_nodes, 60)

    def _two_nodes(self):
        probe = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(address=%r, log_to_driver=False, logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))" % self.address],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
        return probe.stdout.strip().endswith("2")

    def _wait_until(self, ok, seconds):
        end = time.monotonic() + seconds
        while not ok():
            if time.monotonic() > end or any(p.poll() is not None for p in self.procs):
                logs = "\n".join(p.read_text()[-1500:] for p in self.root.glob("node*.log"))
                raise RuntimeError(f"the test Ray cluster did not start:\n{logs}")
            time.sleep(0.5)

    def stop(self):
        for p in reversed(self.procs):  # only the processes this module started, and their Ray children
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="swray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    c = Cluster(root)
    try:
        c.start()
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def source_manifest(tmp_path_factory):
    """A source task for arm-level pretraining: scanned digits other than 3 and 8."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("source")
    digits = load_digits()
    rows = []
    for i in np.flatnonzero(~np.isin(digits.target, [3, 8]))[:60]:
        Image.fromarray((digits.images[i] / 16 * 255).astype(np.uint8), mode="L").save(folder / f"s{i}.png")
        rows.append({"path": f"s{i}.png", "ink": float(digits.images[i].sum() / 16)})
    pd.DataFrame(rows).to_csv(folder / "source.csv", index=False)
    return folder / "source.csv"


def _arms(source_manifest):
    pretrain = {"kind": "pretrain", "epochs": 1, "batch_size": 32, "lr": 3e-3,
                "source": {"manifest": str(source_manifest), "targets": ["ink"], "task": "regression"}}
    return [{"name": "a", "backbone": "scratch:tinycnn", "stages": [PROBE]},
            {"name": "b", "backbone": "scratch:tinycnn",
             "stages": [pretrain, {**PROBE, "epochs": 2}, {"kind": "finetune", "epochs": 1, "batch_size": 16, "lr": 1e-3}]}]


def _recipe(digits_manifest, source_manifest, executor, address=None, **compute):
    compute = {"threads": 1, "save_models": True, "executor": executor, "address": address, **compute}
    return small_recipe(digits_manifest, _arms(source_manifest), evaluation=QUIET, compute=compute)


@pytest.fixture(scope="module")
def local_run(digits_manifest, source_manifest, tmp_path_factory):
    """The reference: the same recipe run locally with 1 torch thread (as each Ray task)."""
    threads = torch.get_num_threads()
    try:
        out = tmp_path_factory.mktemp("local") / "run"
        return run_study(_recipe(digits_manifest, source_manifest, "local"), out)
    finally:
        torch.set_num_threads(threads)


def _assert_same_numbers(a, b, read_back=False):
    """Fold metrics and metrics.json bit for bit. With `read_back` (a resumed run), the
    predictions of the folds read back from their CSV files may differ in the last bit
    (pandas' default float parser), and so may the evidence computed from them, exactly as in
    a resumed local run (test_study): then those two are compared to 1e-9."""
    for arm in ("a", "b"):
        for key in ("summary", "folds"):
            assert same_numbers(a.metrics["arms"][arm][key], b.metrics["arms"][arm][key]), (arm, key)
    if read_back:
        _assert_close(a.metrics["evidence"], b.metrics["evidence"])
        pd.testing.assert_frame_equal(a.predictions, b.predictions, check_exact=False, rtol=1e-12)
    else:
        _assert_identical(a.metrics["evidence"], b.metrics["evidence"])
        pd.testing.assert_frame_equal(a.predictions, b.predictions, check_exact=True)
    ma = json.loads((a.run_dir / "metrics.json").read_text())
    mb = json.loads((b.run_dir / "metrics.json").read_text())
    for m in (ma, mb):
        m.pop("finished"), m.pop("wall_seconds_this_session")
        for arm in m["arms"].values():
            arm.pop("train_seconds"), arm.pop("resources", None)
        if read_back:
            m.pop("evidence")
    assert ma == mb  # metrics.json: every number bit for bit (timings aside)


def _assert_identical(a, b, path="evidence"):
    """Equal structure and exactly equal values, NaN equal to NaN."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), path
    else:
        assert a == b, path


def _assert_close(a, b, path="evidence"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def _same_tensors(path_a: Path, path_b: Path) -> bool:
    from safetensors.torch import load_file

    a, b = load_file(str(path_a)), load_file(str(path_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ray_run_matches_local_bit_for_bit_and_workers_leave_the_run_dir_alone(
        cluster, local_run, digits_manifest, source_manifest):
    out = cluster.runs / "same"
    result = run_study(_recipe(digits_manifest, source_manifest, "ray", cluster.address), out)
    _assert_same_numbers(local_run, result)

    # which nodes ran the fits; both nodes of the cluster took part
    metas = [json.loads(p.read_text()) for p in sorted((out / "folds").glob("*/*.json"))]
    assert len(metas) == 6 and all(m["executor"]["kind"] == "ray" and m["executor"]["threads"] == 1 for m in metas)
    assert len({m["executor"]["node_id"] for m in metas}) == 2
    assert "ray: 2 fit(s) at once" in (out / "log.txt").read_text()

    # files a fit makes came back as bytes and were written by the driver: same content
    local_files = sorted(p.relative_to(local_run.run_dir) for p in local_run.run_dir.rglob("*")
                         if p.suffix in (".png", ".safetensors"))
    ray_files = sorted(p.relative_to(out) for p in out.rglob("*") if p.suffix in (".png", ".safetensors"))
    assert local_files == ray_files and any(p.parts[0] == "pretrained" for p in ray_files)
    assert sum(p.suffix == ".png" for p in ray_files) >= 6 and sum(p.parent.name in "ab" for p in ray_files) == 6
    for rel in ray_files:
        if rel.suffix == ".png":
            assert (out / rel).read_bytes() == (local_run.run_dir / rel).read_bytes(), rel
        else:  # safetensors: same tensors (the header's metadata order is not fixed between processes)
            assert _same_tensors(out / rel, local_run.run_dir / rel), rel
    saliency = [s["file"] for m in metas for s in m.get("saliency", [])]
    assert saliency and all((out / f).is_file() for f in saliency)

    # the workers' file events: many in their private folders, none under the run directories
    touched = cluster.touched.read_text().splitlines() if cluster.touched.exists() else []
    assert any("stagewise-fit-" in line for line in touched), "the audit hook saw no worker writes"
    assert not [line for line in touched if str(cluster.runs) in line]


def test_a_worker_killed_mid_fit_is_retried_and_the_numbers_do_not_change(
        cluster, local_run, digits_manifest, source_manifest):
    for label in ("b.pretrain", "b.r0-f1"):  # the first attempt of each exits after its first epoch
        (cluster.crash / label).touch()
    out = cluster.runs / "killed"
    result = run_study(_recipe(digits_manifest, source_manifest, "ray", cluster.address), out)
    assert not list(cluster.crash.iterdir()), "the worker was not killed"
    _assert_same_numbers(local_run, result)


def test_resume_reads_finished_folds_back_and_submits_only_the_rest(
        cluster, local_run, digits_manifest, source_manifest, monkeypatch):
    from stagewise.study.executors.ray import RayExecutor

    submitted = []
    real_submit = RayExecutor.submit
    monkeypatch.setattr(RayExecutor, "submit", lambda self, unit, split: (submitted.append((unit.name, split.name)),
                                                                           real_submit(self, unit, split)))
    recipe = _recipe(digits_manifest, source_manifest, "ray", cluster.address)
    out = cluster.runs / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_study(recipe, out, StopAfter(2))
    assert len(submitted) == 6
    finished = {(p.parent.name, p.stem) for p in (out / "folds").glob("*/*.json")}
    assert len(finished) == 2
    pretrained = list((out / "pretrained").glob("*.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in pretrained]

    submitted.clear()
    result = run_study(recipe, out)
    assert len(submitted) == 4 and not finished & set(submitted)
    assert [p.stat().st_mtime_ns for p in pretrained] == mtimes  # read back, not pretrained again
    _assert_same_numbers(local_run, result, read_back=True)


def test_an_error_in_a_fit_is_the_fits_own_error_not_a_ray_traceback(cluster, digits_manifest, tmp_path):
    from typer.testing import CliRunner

    from stagewise.cli import app

    diverging = [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{**PROBE, "lr": 1e12}]}]
    recipe = small_recipe(digits_manifest, diverging, evaluation=QUIET,
                          compute={"threads": 1, "executor": "ray", "address": cluster.address})
    with pytest.raises(FloatingPointError, match="lower the learning rate") as caught:
        run_study(recipe, tmp_path / "api")
    assert type(caught.value) is FloatingPointError
    assert "lower the learning rate" in (tmp_path / "api" / "log.txt").read_text()

    yaml_recipe = tmp_path / "r.yaml"
    yaml_recipe.write_text(textwrap.dedent(f"""
        name: diverging
        cohort: {{manifest: {digits_manifest}}}
        data: {{image_size: 32}}
        protocol: {{folds: 2}}
        compute: {{device: cpu, precision: fp32, threads: 1}}
        evaluation: {{saliency: 0, bootstrap: 0, report: false}}
        arms:
          - {{name: a, backbone: 'scratch:tinycnn', stages: [{{kind: probe, epochs: 3, batch_size: 16, lr: 1.0e+12}}]}}
    """))
    result = CliRunner().invoke(app, ["run", str(yaml_recipe), "--out", str(tmp_path / "cli"), "--address", cluster.address])
    assert result.exit_code == 2, result.output
    assert "lower the learning rate" in result.output
    assert "Traceback" not in result.output and "RayTaskError" not in result.output


def test_stagewise_errors_come_back_whole_from_a_worker(cluster, tmp_path):
    from stagewise.study.preflight import StudyCheckError, check_study
    from stagewise.data import CohortError, load_cohort
    from stagewise.study.executors.ray import result
    from stagewise.recipe import CohortConfig, recipe_from_dict
    from stagewise.study.rundir import RunError

    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    try:
        missing = CohortConfig(manifest=tmp_path / "missing.csv")
        with pytest.raises(CohortError) as caught:
            result(ray.remote(load_cohort).options(max_retries=0).remote(missing), "load")
        assert caught.value.problems == [f"manifest not found: {tmp_path / 'missing.csv'}"]
        # StudyCheckError keeps its problems across processes too
        bad = recipe_from_dict({"name": "x", "cohort": {"manifest": str(tmp_path / "missing.csv")},
                                "arms": [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe"}]}]})
        with pytest.raises(StudyCheckError) as checked:
            result(ray.remote(check_study).options(max_retries=0).remote(bad), "check")
        assert len(checked.value.problems) == 1 and "manifest not found" in checked.value.problems[0]
        # an exception that cannot be pickled at all comes back as a RunError naming the fit and
        # the exception's type (Ray keeps no more of it)

        def unpicklable():
            raise RuntimeError("a generator in its arguments", (x for x in range(3)))

        with pytest.raises(RunError, match=r"odd failed in a Ray worker: .*RuntimeError isn't serializable"):
            result(ray.remote(unpicklable).options(max_retries=0).remote(), "odd")
    finally:
        ray.shutdown()


def test_federated_arms_are_refused_before_anything_starts(tmp_path):
    from types import SimpleNamespace

    from stagewise.study.executors.ray import RayExecutor
    from stagewise.recipe import recipe_from_dict
    from stagewise.study.rundir import RunError

    recipe = recipe_from_dict({
        "name": "x", "cohort": {"manifest": str(tmp_path / "m.csv"), "site": "site"},
        "compute": {"executor": "ray"},
        "arms": [{"name": "fed", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
                  "stages": [{"kind": "probe", "epochs": 1, "rounds": 2}]}]})
    with pytest.raises(RunError, match=r"\['fed'\] are federated.*executor: local"):
        RayExecutor(SimpleNamespace(recipe=recipe), None, None).__enter__()
    assert not ray.is_initialized()
