"""`federation site --check` without a coordinator: how --server is read, and what a port
nobody listens on and a file that is no CA are said to mean (the check against a real
coordinator is in tests/e2e/test_deployment.py)."""

import socket

import pytest
from stagewise.federated.connection_check import check_connection, split_server
from stagewise.federated.credentials import make_certificates, make_site_key
from stagewise.federated.rounds import FederatedError


def test_server_is_host_and_port():
    assert split_server("fl.example:9093") == ("fl.example", 9093)
    assert split_server("[::1]:9093") == ("::1", 9093)
    for bad in ("fl.example", "fl.example:http", ":9093", "fl.example:70000"):
        with pytest.raises(FederatedError, match="write HOST:PORT"):
            split_server(bad)


def test_a_port_without_a_coordinator_and_a_wrong_ca_file_are_named(tmp_path):
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"])
    key = make_site_key(tmp_path / "keys", "A")["key"]
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FederatedError, match=rf"cannot connect to 127.0.0.1:{port} .*default, 127.0.0.1, admits no "
                       rf"other computer\) and --port {port}"):
        check_connection(f"127.0.0.1:{port}", certs["ca"], key)
    with pytest.raises(FederatedError, match="not a PEM certificate"):
        check_connection(f"127.0.0.1:{port}", key, key)
    with pytest.raises(FederatedError, match="not this site's private key"):
        check_connection(f"127.0.0.1:{port}", certs["ca"], certs["ca"])


def test_the_it_page_states_the_defaults_the_code_has(tmp_path):
    import datetime
    import inspect
    from pathlib import Path

    from cryptography import x509
    from stagewise.cli.federation_app import federation_coordinate, federation_site

    page = (Path(__file__).parents[3] / "docs" / "federation-it.md").read_text()
    coordinate = inspect.signature(federation_coordinate).parameters
    site = inspect.signature(federation_site).parameters
    assert (coordinate["host"].default.default, coordinate["port"].default.default) == ("127.0.0.1", 9093)
    assert site["port"].default.default == 9094
    assert "(default **127.0.0.1:9093**)" in page and "127.0.0.1:9094 (`--port`)" in page
    cert = x509.load_pem_x509_certificate(make_certificates(tmp_path / "c", ["fl.example"])["cert"].read_bytes())
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc) / datetime.timedelta(days=1)
    assert days == 825 and "valid for **825 days**" in page
