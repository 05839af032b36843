"""`serve`: the local web page and HTTP API that score images with a bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from stagewise.cli.console import PIXELS_HELP, guard, set_max_image_pixels


def serve(
    bundle: Path = typer.Argument(..., help="a bundle folder made by `stagewise export`"),
    host: str = typer.Option("127.0.0.1", help="address to listen on; the default is reachable from this computer only"),
    port: int = typer.Option(8000, min=1, max=65535, help="port to listen on (1-65535)"),
    max_upload_mb: float = typer.Option(64.0, "--max-upload-mb", help="largest file accepted, in MB (2^20 bytes)"),
    engine: str = typer.Option("auto", help="auto (ONNX Runtime when the bundle has model.onnx), onnx or torch"),
    concurrency: int = typer.Option(2, help="files scored at the same time; more requests wait their turn"),
    upload_timeout: float = typer.Option(30.0, "--upload-timeout",
                                         help="seconds an upload may send nothing before it is dropped (408), and a request's headers may take before its connection is closed"),
    max_image_pixels: int = typer.Option(None, "--max-image-pixels", help=PIXELS_HELP),
) -> None:
    """A local web page and HTTP API that score images with a bundle, show what the network
    saw and where it looked. Uploads stay in memory; nothing is stored.

    Example: stagewise serve runs/covid-outcome-icu/bundles/probe-thaw  (then open http://127.0.0.1:8000)
    """
    from stagewise.serve import run_server

    set_max_image_pixels(max_image_pixels)
    guard(run_server, bundle, host, port, max_upload_mb, engine, concurrency, upload_timeout)
