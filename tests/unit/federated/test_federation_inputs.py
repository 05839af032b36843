"""The federation commands' inputs, checked before any Flower process starts: a site name
that is a plain name, certificate files that are what their names say, keys that exist,
relative paths made absolute, and a coordinator that is private to its computer unless told."""

import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from stagewise.cli import app
from stagewise.federated.credentials import check_server_certificates, make_certificates, make_site_key
from stagewise.federated.launch import Coordinator, site_credentials
from stagewise.federated.rounds import FederatedError

runner = CliRunner()


@pytest.mark.parametrize("site", ["../../etc/x", "/tmp/x", "a/b", ".hidden", ""])
def test_a_site_key_is_only_written_under_a_plain_site_name(tmp_path, site):
    result = runner.invoke(app, ["federation", "key", str(tmp_path / "keys"), "--site", site])
    assert result.exit_code == 2 and "site name" in result.output
    assert not (tmp_path / "keys" / "../../etc").resolve().exists()
    assert not list(tmp_path.rglob("*.key")) and not list(tmp_path.rglob("*.pub"))
    with pytest.raises(ValueError, match="site name"):
        make_site_key(tmp_path / "keys", site)


def test_swapped_or_mismatched_certificate_files_are_named(tmp_path):
    good = make_certificates(tmp_path / "good", ["127.0.0.1"])
    check_server_certificates(tmp_path / "good")  # the files `federation certs` made pass
    swapped = tmp_path / "swapped"
    shutil.copytree(tmp_path / "good", swapped)
    (swapped / "ca.pem").write_bytes(good["cert"].read_bytes())
    (swapped / "server.pem").write_bytes(good["ca"].read_bytes())
    with pytest.raises(ValueError, match=r"ca\.pem and .*server\.pem look swapped"):
        check_server_certificates(swapped)
    key_for_cert = tmp_path / "keyswap"
    shutil.copytree(tmp_path / "good", key_for_cert)
    (key_for_cert / "server.key").write_bytes(good["cert"].read_bytes())
    with pytest.raises(ValueError, match=r"server\.key is not an unencrypted PEM private key"):
        check_server_certificates(key_for_cert)
    other = make_certificates(tmp_path / "other", ["127.0.0.1"])
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "good", mixed)
    (mixed / "server.key").write_bytes(other["key"].read_bytes())
    with pytest.raises(ValueError, match=r"server\.key is not the key of .*server\.pem"):
        check_server_certificates(mixed)
    # the coordinator says so before it starts anything
    coordinator = Coordinator(tmp_path / "run", swapped)
    with pytest.raises(FederatedError, match="look swapped"):
        coordinator.start()
    assert coordinator.process is None and not (tmp_path / "run").exists()


def test_relative_paths_reach_flower_as_absolute_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = Coordinator(Path("runs/job"), Path("certs"), site_keys=[Path("a.pub")])
    assert c.run_dir == tmp_path / "runs" / "job" and c.certs == tmp_path / "certs"
    assert c.site_keys == [tmp_path / "a.pub"]
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "a.key").write_text("x")
    assert site_credentials(Path("ca.pem"), Path("keys/a.key")) == (tmp_path / "ca.pem", tmp_path / "keys" / "a.key")


def test_a_missing_site_key_is_named_before_the_manifest_is_read(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    result = runner.invoke(app, ["federation", "site", str(tmp_path / "no-recipe.yaml"), "--manifest", "m.csv",
                                 "--site", "A", "--server", "127.0.0.1:1", "--ca", str(tmp_path / "ca.pem"),
                                 "--key", str(tmp_path / "missing.key")])
    assert result.exit_code == 2, result.output
    assert "missing.key: no such file, given as --key" in " ".join(result.output.split())
    assert not (tmp_path / "federation-site").exists()


def test_the_coordinator_listens_on_this_computer_only_unless_told():
    command = typer.main.get_command(app).commands["federation"].commands["coordinate"]
    host = next(p for p in command.params if p.name == "host")
    assert host.default == "127.0.0.1" and "this computer only" in host.help
    assert Coordinator(Path("x"), None).host == "127.0.0.1"


def test_a_coordinator_that_cannot_admit_its_sites_leaves_nothing_running(tmp_path):
    """A file that is not a site's public key is named before anything starts; a key the
    SuperLink refuses (one hospital's key sent under two names) fails the start, and the
    SuperLink it had started is stopped with it (not left holding the port and the database)."""
    import socket

    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"])["ca"].parent
    keys = make_site_key(tmp_path / "keys", "a")
    wrong = Coordinator(tmp_path / "run", certs, site_keys=[keys["key"]])  # the private key, sent by mistake
    with pytest.raises(FederatedError, match=r"a\.key: not a site's public key"):
        wrong.start()
    assert wrong.process is None
    twin = tmp_path / "keys" / "b.pub"
    shutil.copy(keys["pub"], twin)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    coordinator = Coordinator(tmp_path / "run", certs, port=port, site_keys=[keys["pub"], twin])
    with pytest.raises(FederatedError, match=r"could not admit site key b\.pub: .*already in use"):
        coordinator.start()
    assert coordinator.process.poll() is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the hospitals' port is free again
