"""Whether a host name or address a server listens on is this computer only: the bedside
server and the federation coordinator both say so when they start, and neither imports
torch for it."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
