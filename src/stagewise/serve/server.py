"""`stagewise serve`: run the application with uvicorn, on this computer only by default."""

from __future__ import annotations

import sys
from pathlib import Path

from stagewise.bundle import Bundle
from stagewise.errors import RunError
from stagewise.hosts import is_loopback
from stagewise.serve.connection import header_deadline_protocol
from stagewise.serve.upload import UPLOAD_TIMEOUT_S

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1"]


def check_port(port: int) -> int:
    if not 1 <= port <= 65535:  # uvicorn would listen on the port modulo 65536 and print this one
        raise RunError(f"--port {port}: a port is a number from 1 to 65535")
    return port


def log_config() -> dict:
    """uvicorn's logging, plus the application's own logger. The access log holds the method,
    path and status of each request: never its query string (a client may put a patient id
    there), never an upload's name or content."""
    from uvicorn.config import LOGGING_CONFIG

    config = {**LOGGING_CONFIG, "loggers": {**LOGGING_CONFIG["loggers"]},
              "formatters": {**LOGGING_CONFIG["formatters"]}}
    config["formatters"]["access"] = {**config["formatters"]["access"], "()": "stagewise.serve.access_log.PathOnlyAccessFormatter"}
    config["loggers"]["stagewise.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def run_server(bundle_path: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 64.0,
               engine: str = "auto", concurrency: int = 2, upload_timeout_s: float = UPLOAD_TIMEOUT_S) -> None:
    import uvicorn

    from stagewise.serve.app import create_app

    check_port(port)
    if max_upload_mb <= 0:
        raise RunError("--max-upload-mb must be positive")
    if upload_timeout_s <= 0:
        raise RunError("--upload-timeout must be a positive number of seconds")
    bundle = Bundle.load(bundle_path)
    loopback = is_loopback(host)
    try:
        app = create_app(bundle, max_upload_mb, engine, concurrency,
                         allowed_hosts=LOOPBACK_NAMES + ([host] if host not in LOOPBACK_NAMES else []) if loopback else None,
                         upload_timeout_s=upload_timeout_s)
    except ValueError as err:
        raise RunError(str(err)) from None
    app.state.scorer.warm_up()
    shown = f"[{host}]" if ":" in host else host
    print(f"stagewise serve: {bundle.info['recipe']} ({', '.join(t['output'] for t in bundle.info['tasks'])}), "
          f"engine {app.state.scorer.engine}; page at http://{shown}:{port}/ , API docs at /docs. Research use only. "
          f"Uploads up to {max_upload_mb:g} MB, kept in memory, never stored.", file=sys.stderr, flush=True)
    for notice in bundle.notices:
        print(f"note: {notice}", file=sys.stderr, flush=True)
    if not loopback:
        print(f"warning: listening on {host}: other computers on the network can reach this server, and it has no "
              "login. Use the default --host 127.0.0.1 unless a firewall or proxy protects it.", file=sys.stderr, flush=True)
    # an idle connection between requests is closed after 5 s; headers that take longer than upload_timeout_s
    # (connection.py) and a stalled upload (upload.py) close theirs too
    uvicorn.run(app, host=host, port=port, log_config=log_config(), access_log=True, server_header=False,
                timeout_keep_alive=5, http=header_deadline_protocol(upload_timeout_s))
