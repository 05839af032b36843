"""`stagewise federation site --check`: what a hospital's IT can prove before a real job, without
taking part in one: this site's files (ca.pem, its private key), a connection from here to the
coordinator's port (through HTTPS_PROXY where one is set, as Flower's SuperNode connects), a TLS
handshake that verifies the coordinator's certificate against ca.pem and the name in --server,
and that what answers there is a stagewise coordinator's hospitals' listener (the Fleet API
alone). The manifest is checked by the caller (`launch.prepare_site`), as a real start does.

Whether the coordinator admitted this site's key is not asked: on Flower's Fleet API the only
question that tells it is activating the node, and an activated node counts as a connected
site of a job that may be waiting for its sites. The check prints the key's fingerprint
instead, which the coordinator's list of admitted sites (`RUN/federation/admitted.json`)
must show.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from stagewise.federated.credentials import private_key_fingerprint
from stagewise.federated.job import FederatedError
from stagewise.federated.superlink_process import NOT_SERVED

TIMEOUT = 15.0
"""Seconds the connection and the answer may take."""


def split_server(server: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets) -> (host, port), or a FederatedError saying how to write it."""
    host, sep, port = server.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FederatedError(f"--server {server!r}: write HOST:PORT, e.g. fl.coordinator.example:9093")
    return host, int(port)


def _ca_lines(ca: Path) -> tuple[ssl.SSLContext, str]:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(ca.read_bytes())
        context = ssl.create_default_context(cafile=str(ca))
    except (ValueError, ssl.SSLError) as err:
        raise FederatedError(f"{ca}: not a PEM certificate ({err}); the coordinator's `stagewise federation certs` "
                             "made ca.pem: ask for that file") from None
    until = cert.not_valid_after_utc
    days = (until - datetime.datetime.now(datetime.timezone.utc)).days
    if days < 0:
        raise FederatedError(f"{ca}: the coordinator's CA expired on {until:%Y-%m-%d}; the coordinator makes new "
                             "certificates (`stagewise federation certs` in a new folder) and sends the new ca.pem")
    return context, f"ca.pem: the coordinator's CA, valid until {until:%Y-%m-%d} ({days} days)"


def _failure(err: Exception, host: str, port: int) -> str:
    """What a failed connection means for whoever runs the network, in words."""
    import httpx

    text = str(err)
    if "CERTIFICATE_VERIFY_FAILED" in text or isinstance(err, ssl.SSLCertVerificationError):
        return (f"TLS: the certificate at {host}:{port} is not one this ca.pem vouches for {host!r} ({text}). Use the "
                "ca.pem of this coordinator, and a --server name the coordinator's `federation certs --host` listed")
    if isinstance(err, httpx.ProxyError):
        return f"the proxy (HTTPS_PROXY) refused to connect to {host}:{port} ({text}); it must allow CONNECT to that port"
    if isinstance(err, httpx.TimeoutException):
        return (f"no answer from {host}:{port} within {TIMEOUT:.0f} s: a firewall drops the connection (this computer "
                f"connects out to TCP port {port}; the coordinator must accept it there), or a proxy is needed "
                "(set HTTPS_PROXY)")
    if "Name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
        return f"the name {host!r} does not resolve here ({text}); use the name or address the coordinator gave"
    return (f"cannot connect to {host}:{port} ({text}): is `stagewise federation coordinate` running there with "
            f"--host set to an address this computer reaches (its default, 127.0.0.1, admits no other computer) "
            f"and --port {port}, and does a firewall let this computer connect out to that port?")


def check_connection(server: str, ca: Path, key: Path) -> list[str]:
    """Lines saying what was proven; a FederatedError naming the first thing that failed."""
    import httpx

    host, port = split_server(server)
    context, ca_line = _ca_lines(ca)
    try:
        fingerprint = private_key_fingerprint(key)
    except ValueError as err:
        raise FederatedError(str(err)) from None
    url = f"https://{host if ':' not in host else f'[{host}]'}:{port}/"
    try:
        with httpx.Client(verify=context, timeout=TIMEOUT, trust_env=True) as client:
            answer = client.get(url)
    except (httpx.HTTPError, ssl.SSLError, OSError) as err:
        raise FederatedError(_failure(err, host, port)) from None
    if answer.status_code != 404 or NOT_SERVED not in answer.text:
        raise FederatedError(f"{host}:{port} answers TLS with a certificate of this ca.pem, but not as a stagewise "
                             f"coordinator's hospitals' listener (HTTP {answer.status_code}); is --server the port of "
                             "`stagewise federation coordinate` (default 9093)?")
    return [ca_line,
            f"key: this site's private key, fingerprint {fingerprint}; the coordinator's "
            "RUN/federation/admitted.json must list it under this site's name (not asked here: asking would "
            "join the job)",
            f"connection: {host}:{port} reached from here" + (" through the proxy of HTTPS_PROXY" if _proxied(host) else ""),
            f"TLS: the coordinator's certificate is signed by this ca.pem and made for {host}",
            "coordinator: a stagewise coordinator's hospitals' listener answers (the Fleet API only)"]


def _proxied(host: str) -> bool:
    """Whether httpx went through HTTPS_PROXY to `host` (it reads the same variables, NO_PROXY included)."""
    import urllib.request

    return bool(urllib.request.getproxies().get("https")) and not urllib.request.proxy_bypass(host)
