"""At the bedside: a local web page and HTTP API that score images with an exported bundle.

`stagewise serve BUNDLE` starts it on 127.0.0.1; `create_app(bundle)` gives the FastAPI
application (for tests, or another ASGI server). Nothing uploaded is written to disk.
"""

from stagewise.serve.app import create_app
from stagewise.serve.server import run_server

__all__ = ["create_app", "run_server"]
