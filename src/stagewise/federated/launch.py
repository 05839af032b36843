"""Starting the Flower processes of a deployment: the coordinator's SuperLink and job, a
hospital's SuperNode. These are Flower's own programs (`flower-superlink`, `flower-supernode`,
`flwr run`), started with TLS and SuperNode authentication; stagewise only prepares their
settings and the Flower app they run.

- `prepare_site`: check a hospital's manifest against the recipe (every problem at once) and
  write its site file and resolved recipe into its work folder. Nothing there leaves the site.
- `Coordinator`: a SuperLink (its state in the run directory, so a restart keeps the
  registered sites), the sites' public keys registered, the job submitted, its end awaited.
- `start_site`: a SuperNode that connects to the coordinator, verifies its certificate with
  the CA file, proves its identity with the site's key, and runs stagewise's ClientApp in one
  process that lives for the whole job (`federated.site_process`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stagewise.data import load_cohort
from stagewise.federated.credentials import check_server_certificates, key_fingerprint, public_key_pem
from stagewise.federated.job_dir import RUN_DIR_ENV, SITE_KEY, JobDir
from stagewise.federated.job import SITE_NAME, FederatedError, FederatedJob, SiteConfig
from stagewise.federated.linkage import read_linkage_key
from stagewise.federated.polling import SITE_POLL
from stagewise.federated.process_tree import stop_process
from stagewise.federated.site_process import ISOLATION, REFUSED_EXIT
from stagewise.federated.superlink_process import CONTROL_READY, READY, SITES_GATE
from stagewise.recipe import load_recipe, recipe_to_dict

APP_TOML = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "stagewise-federation"
version = "1.0.0"
description = "A stagewise federated job: the ServerApp and ClientApp of the stagewise each site installed"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "stagewise"

[tool.flwr.app.components]
serverapp = "{server}"
clientapp = "{client}"
"""
TRAINING_APPS = ("stagewise.federated.deployment:server_app", "stagewise.federated.deployment:client_app")
"""The (ServerApp, ClientApp) components of a training job; a federated evaluation of a
bundle names its own (`stagewise.external.federated_app`)."""


def _free_local_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the SuperLink's control port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flower_env(home: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "RAY_DISABLE_USAGE_STATS": "1",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def _program(name: str) -> str:
    """A Flower program beside this Python (the environment stagewise is installed in)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise FederatedError(f"{name} (part of Flower) is not installed beside {sys.executable}; reinstall stagewise")
    return found


def prepare_site(recipe: str | Path, manifest: str | Path, site: str, workdir: str | Path, threads: int = 1,
                 linkage_key: str | Path | None = None) -> Path:
    """Check this hospital's data for the recipe and write its site file; returns its path.
    `linkage_key`: the hospitals' shared key that lets the coordinator count patients seen at
    several sites without learning who (federated/linkage.py)."""
    if not SITE_NAME.match(site):
        raise FederatedError(f"site name {site!r}: use letters, digits, '_', '.', '-' (at most 64), no patient data")
    manifest, workdir = Path(manifest).resolve(), Path(workdir).resolve()
    r = load_recipe(recipe, [f"cohort.manifest={manifest}", "cohort.site=null"])  # this machine is one site
    for arm in r.arms:
        if arm.sites.mode == "federated":
            FederatedJob.of(r, arm.name)  # a clear error if the arm cannot be deployed
    if not any(a.sites.mode == "federated" for a in r.arms):
        raise FederatedError(f"{recipe}: no arm has sites.mode federated")
    if linkage_key is not None:
        linkage_key = Path(linkage_key).resolve()
        read_linkage_key(linkage_key)  # a clear error now, not at the coordinator's first message
    load_cohort(r.cohort, decode=True)  # every row and image checked; all problems in one error
    workdir.mkdir(parents=True, exist_ok=True)
    data = recipe_to_dict(r)
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return SiteConfig(workdir / "recipe.yaml", site, workdir, threads, linkage_key).save(workdir / "site.json")


def _reason(err: Exception) -> str:
    """What the SuperLink answered a refused request with: its JSON `detail`, else the error."""
    response = getattr(err, "response", None)
    if response is None:
        return f"{type(err).__name__}: {err}"
    try:
        return f"{response.json()['detail']} (HTTP {response.status_code})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:300]}"


def _write_connection(home: Path, address: str, ca: Path | None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "coordinator"', "", "[superlink.coordinator]", f'address = "{address}"']
    lines.append(f'root-certificates = "{ca}"' if ca else "insecure = true")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


@dataclass
class Coordinator:
    """The coordinating site's SuperLink and the job it runs (one run directory)."""

    run_dir: Path
    certs: Path | None
    """Folder with ca.pem, server.pem, server.key (see credentials); None: no TLS (tests only)."""
    host: str = "127.0.0.1"
    port: int = 9093
    site_keys: list[Path] = field(default_factory=list)
    """The public keys of the admitted sites; with none, authentication is off (tests only)."""
    log: Path | None = None
    process: subprocess.Popen | None = None
    apps: tuple[str, str] = TRAINING_APPS
    """The Flower app's (ServerApp, ClientApp) components, from the stagewise installed here."""

    def __post_init__(self):
        # Flower's programs run with the run directory's Flower home as their working folder:
        # a relative path given on the command line would name another file there
        self.run_dir = Path(self.run_dir).resolve()
        self.certs = Path(self.certs).resolve() if self.certs else None
        self.site_keys = [Path(k).resolve() for k in self.site_keys]

    @property
    def home(self) -> Path:
        return self.run_dir / "federation" / "flower"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink (the hospitals' Fleet API on host:port, its control and runtime
        APIs on 127.0.0.1 only: `federated.superlink_process`) and admit the sites' keys."""
        if self.certs:
            try:
                check_server_certificates(self.certs)  # a clear error, not the SuperLink's traceback
            except ValueError as err:
                raise FederatedError(str(err)) from None
        if missing := [str(k) for k in self.site_keys if not k.is_file()]:
            raise FederatedError(f"{', '.join(missing)}: no such site key (each hospital makes one with "
                                 "`stagewise federation key` and sends its .pub file)")
        try:
            keys = {key: public_key_pem(key) for key in self.site_keys}  # every key read before anything starts
        except ValueError as err:
            raise FederatedError(str(err)) from None
        self.home.mkdir(parents=True, exist_ok=True)
        self.control_port = _free_local_port()
        cmd = [sys.executable, "-m", "stagewise.federated.superlink_process", self.host, str(self.port), "--",
               "--host", "127.0.0.1", "--port", str(self.control_port), "--isolation", "process",
               "--database", str(self.home / "superlink.db"), "--disable-runtime-dependency-installation"]
        ca = None
        if self.certs:
            ca = self.certs / "ca.pem"
            cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key")]
        else:
            cmd += ["--insecure"]
        if self.site_keys:
            cmd += ["--enable-supernode-auth"]
        _write_connection(self.home, f"127.0.0.1:{self.control_port}", ca)
        self.log = self.home / "superlink.log"
        self._log_start = self.log.stat().st_size if self.log.is_file() else 0  # the log of earlier starts is kept
        out = self.log.open("ab")
        gate = self.home / SITES_GATE
        gate.unlink(missing_ok=True)  # an earlier start's: the hospitals' listener waits for this start's admission
        self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=_flower_env(self.home, {RUN_DIR_ENV: str(self.run_dir)}))
        try:
            self._wait_ready(CONTROL_READY, timeout)
            if self.site_keys:  # the job's list: the ServerApp answers these nodes only
                nodes = {self._register(key, pem): key.stem for key, pem in keys.items()}
                JobDir(self.run_dir).admit(nodes, {key.stem: key_fingerprint(key) for key in self.site_keys})
            gate.touch()  # now the hospitals' listener opens: no site is refused for a key not yet admitted
            self._wait_ready(READY, timeout)
        except BaseException:  # a start that fails leaves no SuperLink behind holding the port and the database
            self.stop()
            raise

    def _flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([_program("flwr"), *args], capture_output=True, text=True, timeout=timeout,
                              env=_flower_env(self.home), cwd=self.home)

    def _wait_ready(self, line: str, timeout: float) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.process.poll() is not None:
                raise FederatedError(f"the SuperLink stopped at start (exit {self.process.returncode}); see {self.log}")
            if line.encode() in self.log.read_bytes()[self._log_start:]:
                return
            time.sleep(0.1)
        raise FederatedError(f"the SuperLink did not start within {timeout:.0f} s; see {self.log}")

    def _register(self, key: Path, pem: bytes) -> int:
        """Admit a site's public key; its node id. On a restart the SuperLink's database has
        it already, and the node id recorded at the first start is the one.

        The Control API's RegisterNode, called as `flwr supernode register` calls it (Flower's
        own client and interceptors), from this process: with a `flwr` process per key (about a
        second of CPU each, while the hospitals' processes start on the same cores) the
        benchmark's sites were admitted 17 s after the start, now 8 s (RESULTS.md)."""
        from flwr.proto.control_pb2 import RegisterNodeRequest

        request = RegisterNodeRequest(public_key=pem, name=key.stem)
        text = ""
        for _ in range(5):  # the HTTP API may come up a moment after the server says it runs
            client = self._control_client()
            try:
                return int(client.RegisterNode(request=request).node_id)
            except Exception as err:  # noqa: BLE001 - Flower's client errors carry the server's message
                text = _reason(err)
            finally:
                client.close()
            if "unavailable" not in text.lower() and "connect" not in text.lower():
                break
            time.sleep(1.0)
        if "already" in text.lower():
            known = JobDir(self.run_dir).admitted().get(key.stem, {})
            if known.get("key") == key_fingerprint(key):
                return int(known["node"])
        raise FederatedError(f"could not admit site key {key.name}: {text.strip()[-400:]}")

    def _control_client(self):
        """A client of the SuperLink's Control API on 127.0.0.1, as the `flwr` CLI makes it."""
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        ca = (self.certs / "ca.pem").read_bytes() if self.certs else None
        return ControlHttpClient.from_server_address(
            server_address=f"127.0.0.1:{self.control_port}", insecure=ca is None, root_certificates=ca,
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")])

    def submit(self) -> str:
        """Submit the job (a Flower app with no code: stagewise's own components)."""
        app = self.home / "app"
        app.mkdir(parents=True, exist_ok=True)
        (app / "pyproject.toml").write_text(APP_TOML.format(server=self.apps[0], client=self.apps[1]))
        res = self._flwr("run", str(app), "coordinator", "--format", "json")
        if res.returncode != 0:
            raise FederatedError(f"flwr run failed: {(res.stdout + res.stderr).strip()[-600:]}")
        try:
            return str(json.loads(res.stdout[res.stdout.index("{"):])["run-id"])
        except (ValueError, KeyError):
            raise FederatedError(f"flwr run gave no run id: {res.stdout.strip()[-400:]}") from None

    def wait(self, run_id: str, timeout: float) -> dict:
        """Wait for run `run_id` to finish or fail (status.json, written by its ServerApp)."""
        status_file = JobDir(self.run_dir).fed / "status.json"
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if status_file.is_file():
                try:
                    status = json.loads(status_file.read_text())
                except ValueError:
                    status = {}
                if status.get("run") == run_id and status.get("state") in ("finished", "failed", "stopped"):
                    return status
            if self.process.poll() is not None:
                raise FederatedError(f"the SuperLink stopped (exit {self.process.returncode}); see {self.log}")
            time.sleep(0.1)  # a small file read: the command returns as soon as the job has
        raise FederatedError(f"the job did not finish within {timeout:.0f} s")

    def stop(self) -> None:
        stop_process(self.process)


def site_credentials(ca: Path | None, key: Path | None) -> tuple[Path | None, Path | None]:
    """The coordinator's CA file and the site's private key as absolute paths (Flower reads
    them from another working folder); a clear error naming a file that is not there."""
    ca, key = (Path(p).resolve() if p else None for p in (ca, key))
    for what, path in (("--ca (the coordinator's ca.pem)", ca), ("--key (this site's <site>.key)", key)):
        if path is not None and not path.is_file():
            raise FederatedError(f"{path}: no such file, given as {what}; a hospital makes its key with "
                                 "`stagewise federation key` and receives ca.pem from the coordinator")
    return ca, key


def start_site(site_file: Path, superlink: str, ca: Path | None, key: Path | None, port: int = 9094,
               log: Path | None = None, max_wait: float | None = None, client_app: str = TRAINING_APPS[1]
               ) -> subprocess.Popen:
    """A hospital's SuperNode, connected to the coordinator at `superlink` (host:port), whose
    ClientApp tasks run in one long-lived process (`federated.site_process`), not one process
    per message. `port`: the SuperNode's Runtime API on 127.0.0.1, which that process asks.
    `client_app`: the ClientApp this site runs (its own choice: the coordinator's app names
    none that the site runs), and the site file is of that app's kind."""
    ca, key = site_credentials(ca, key)
    home = Path(site_file).resolve().parent / "flower"
    home.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "stagewise.federated.site_process", str(port), client_app, "--",
           sys.executable, "-m", "stagewise.federated.polling", str(SITE_POLL), "--",  # Flower's SuperNode, prompt
           *ISOLATION, "--superlink", superlink, "--port", str(port),
           "--node-config", f'{SITE_KEY}="{Path(site_file).resolve()}"']
    cmd += ["--root-certificates", str(ca)] if ca else ["--insecure"]
    if key:
        cmd += ["--auth-supernode-private-key", str(key)]
    if max_wait:
        cmd += ["--max-wait-time", str(max_wait)]
    out = (log or home / "supernode.log").open("ab")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=_flower_env(home))


def run_site(site_file: Path, superlink: str, ca: Path | None, key: Path | None, port: int, log: Path,
             wait: float = 3600.0, retry_every: float = 15.0, on_retry=None, client_app: str = TRAINING_APPS[1]) -> int:
    """Run a hospital's SuperNode until it ends; its exit code. While the coordinator cannot be
    reached, or has not admitted this site's key yet, start it again every `retry_every`
    seconds for up to `wait` seconds, so a hospital may start before the coordinator."""
    t0 = time.monotonic()
    while True:
        start = log.stat().st_size if log.exists() else 0
        process = start_site(site_file, superlink, ca, key, port=port, log=log, client_app=client_app)
        try:
            code = process.wait()
        finally:
            stop_process(process)
        text = log.read_bytes()[start:].decode(errors="replace")
        refused = "could not establish a connection" in text or "Failed to activate" in text
        if code == REFUSED_EXIT or code == 0 or not refused or time.monotonic() - t0 + retry_every > wait:
            return code
        if on_retry is not None:
            on_retry(time.monotonic() - t0)
        time.sleep(retry_every)


__all__ = ["TRAINING_APPS", "Coordinator", "prepare_site", "run_site", "site_credentials", "start_site"]
