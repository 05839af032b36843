"""Stopping a Flower process and every process it started (Linux /proc): Flower's SuperLink
and SuperNode start their apps in sessions of their own, which a signal to the process group
would miss, and a stopped coordinator or site must leave no app behind holding a port."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (the module docstring says why not a group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_process(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Stop a Flower process and every process it started."""
    if process is None:
        return
    tree = _descendants(process.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [process.pid, *tree]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + timeout
        while any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in tree):
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


__all__ = ["stop_process"]
