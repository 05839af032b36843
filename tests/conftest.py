import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# compute: auto caches its measured choices; tests keep theirs out of the user's cache directory
if "STAGEWISE_CACHE_DIR" not in os.environ:
    os.environ["STAGEWISE_CACHE_DIR"] = tempfile.mkdtemp(prefix="stagewise-test-cache-")
    atexit.register(shutil.rmtree, os.environ["STAGEWISE_CACHE_DIR"], ignore_errors=True)

from stagewise.training.compute import usable_cpus  # noqa: E402 - after the environment above is set


def _test_threads() -> int:
    """Torch threads per test process: STAGEWISE_TEST_THREADS, else the CPUs shared out among
    pytest-xdist's workers (at most 2 each: these tensors are small)."""
    if os.environ.get("STAGEWISE_TEST_THREADS"):
        return int(os.environ["STAGEWISE_TEST_THREADS"])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, usable_cpus() // max(1, workers)))


torch.set_num_threads(_test_threads())

from stagewise.study.fitting import SilentReporter  # noqa: E402 - after the environment above is set


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per CPU this process may use (xdist's own
    default counts the machine's cores, more than a container or taskset allows). A third
    worker on 2 CPUs was slower (the federated and deployment tests then contend for CPUs)."""
    return usable_cpus()


SLOWEST_FIRST = ("test_deployment.py", "test_executor_ray.py", "test_federated.py", "test_same_behaviour.py",
                 "test_study.py", "test_federated_evaluation_deployment.py", "test_refit_bundles.py",
                 "test_pretrain.py", "test_ray_session.py", "test_strategies.py", "test_executors.py",
                 "test_secure_aggregation.py", "test_evidence_units.py", "test_executor.py", "test_serve.py")
"""Modules of minutes, handed to the xdist workers first so that no long one starts last."""


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    """Keep a module's tests on one xdist worker where they share a module-scoped fixture of
    that module (a trained run, a server, a Ray cluster): a fixture is made once per worker,
    so spreading such a module would build it once on every worker. Other tests are spread
    one by one, the slowest modules first (the order within a module is kept)."""
    for item in items:  # tests/e2e: real servers, clusters, browsers and federations
        if "e2e" in item.path.relative_to(config.rootpath).parts:
            item.add_marker(pytest.mark.e2e)
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        module = item.nodeid.split("::")[0]
        defs = getattr(info, "name2fixturedefs", {}) or {}
        if any(d.scope == "module" and d.baseid == module for fixturedefs in defs.values() for d in fixturedefs):
            item.add_marker(pytest.mark.xdist_group(module))


class _SharedRay:
    """One Ray instance for the Flower simulations of consecutive `flower`-marked tests on an
    xdist worker (`federated.simulation_session.one_ray_instance`, which a study's local executor
    uses for its folds): Flower would start and stop Ray for every simulation (several seconds
    each). It is stopped before a `ray_of_its_own` test (one that starts a Ray cluster of its
    own, or checks that none is left running) and at the end of the session."""

    block = None

    @classmethod
    def open(cls):
        if cls.block is None:
            from stagewise.federated.simulation_session import one_ray_instance

            cls.block = one_ray_instance()
            cls.block.__enter__()

    @classmethod
    def close(cls):
        if cls.block is not None:
            block, cls.block = cls.block, None
            block.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _ray_for_flower_tests(request):
    """xdist hands a worker tests of several modules in turn: the shared instance stays up
    between `flower` tests and is stopped only before a test that needs Ray to itself."""
    if request.node.get_closest_marker("ray_of_its_own"):
        _SharedRay.close()
    elif request.node.get_closest_marker("flower"):
        _SharedRay.open()
    yield


@pytest.fixture(autouse=True, scope="module")
def _no_shared_ray_in_modules_that_start_their_own(request):
    """Before such a module's own module-scoped fixtures (a Ray cluster) are made."""
    if request.node.get_closest_marker("ray_of_its_own"):
        _SharedRay.close()
    yield


def pytest_sessionfinish(session, exitstatus):
    _SharedRay.close()


@pytest.fixture(scope="session")
def digits_manifest(tmp_path_factory):
    """A small real-image cohort: scikit-learn's scanned digits, 3 vs 8, two scans per patient."""
    from stagewise.study.demo import make_demo_cohort

    return make_demo_cohort(tmp_path_factory.mktemp("digits"), per_class=40)


@pytest.fixture(scope="session")
def sites_manifest(digits_manifest, tmp_path_factory):
    """The digits cohort spread over three hospitals in a `hospital` column (whole patients,
    both classes at each): the multi-site and federated tests' cohort."""
    import pandas as pd

    table = pd.read_csv(digits_manifest)
    table["path"] = [str(digits_manifest.parent / p) for p in table["path"]]
    patients = table["patient"].unique()
    table["hospital"] = table["patient"].map({p: "ABC"[i % 3] for i, p in enumerate(patients)})
    path = tmp_path_factory.mktemp("sites") / "sites.csv"
    table.to_csv(path, index=False)
    return path


def dicom_bytes(pixels=None, transfer_syntax=None, **elements) -> bytes:
    """A DICOM file in memory: a grey-level image of `pixels` (H, W) or frames stacked on
    the first axis (8-bit when `BitsAllocated=8`, else 16-bit; stored bits = allocated unless
    given), without pixel data when `pixels` is None, in `transfer_syntax` (explicit little
    endian by default; deflate shrinks a large image of zeros to almost nothing). `elements`
    set or override any data element (Modality, ViewPosition, NumberOfFrames, ...)."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        allocated = elements.get("BitsAllocated", 16)
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8 if allocated == 8 else np.uint16)
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.BitsAllocated = ds.BitsStored = allocated
        ds.HighBit, ds.PixelRepresentation = allocated - 1, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    for key, value in elements.items():
        setattr(ds, key, value)
    if pixels is not None:
        ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def small_recipe(manifest, arms, **overrides):
    """A recipe dict for fast tests: 32 px, float32 on CPU, 3 folds, 200 bootstrap resamples
    (the default 2000 cost more than the training: each resample scores every metric again)."""
    from stagewise.recipe import recipe_from_dict

    data = {
        "name": "test",
        "seed": 0,
        "cohort": {"manifest": str(manifest)},
        "data": {"image_size": 32},
        "protocol": {"folds": 3, "repeats": 1},
        "compute": {"device": "cpu", "precision": "fp32", "channels_last": False},
        "evaluation": {"bootstrap": 200},
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
