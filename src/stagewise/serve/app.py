"""The FastAPI application: the bedside page, its assets, and the HTTP API behind it.

- `GET /`: the page (HTML, CSS and JavaScript served from the package: no CDN, no web fonts).
- `POST /predict`: multipart field `file` -> a probability, the decision and the threshold per
  output (stated as `serve.wording` words it), and the probability's place among the
  cross-validated models' (out-of-fold) scores.
- `POST /explain`: the same, plus the image as the network saw it and a Grad-CAM map per output.
- `GET /model-card`, `GET /validation`, `GET /health`.
- `GET /docs`: Swagger UI from the swagger-ui-bundle package's local copy; `GET /openapi.json`.

Uploads are read into memory (see `upload`), scored in a worker thread (the event loop stays
free for the page) and dropped with the response: nothing is written to disk, nothing is kept.
A request's file name never reaches a log; error answers are plain sentences, never a trace.
"""

from __future__ import annotations

import logging
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from stagewise.version import __version__
from stagewise.bundle import Bundle
from stagewise.serve.card import model_card
from stagewise.serve.refusals import Problem
from stagewise.serve.scorer import Scorer, heatmap_data_url, png_data_url
from stagewise.serve.upload import FIELD, UPLOAD_TIMEOUT_S, read_upload
from stagewise.serve.wording import heatmap_note, output_wording, overall_note

log = logging.getLogger("stagewise.serve")
STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_MB = 64.0
_PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
             "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
             "frame-ancestors 'none'")
_DOCS_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"


class Position(BaseModel):
    below: float | None = Field(description="share of the cross-validated models' (out-of-fold) scores below this one")
    below_with_outcome: float | None = Field(description="the same among those scores of images with the outcome")
    below_without_outcome: float | None = Field(description="the same among those of images without it")
    n: int
    n_with_outcome: int
    n_without_outcome: int


class OutputScore(BaseModel):
    output: str = Field(description="the bundle output (an arm, or arm:outcome for an extra outcome)")
    outcome: str = Field(description="the outcome's column in the development cohort")
    outcome_label: str | None = Field(None, description="the outcome in clinical words, when the recipe gave them")
    outcome_horizon: str | None = Field(None, description="when the outcome counts, when the recipe gave it")
    outcome_text: str = Field(description="the outcome as the page names it: label (else column) and time frame")
    probability: float = Field(ge=0, le=1)
    threshold: float = Field(description="the bundle's decision threshold (its model card says by which rule, on which scores)")
    decision: bool = Field(description="probability >= threshold")
    state: Literal["flagged", "below_threshold"] = Field(
        description="flagged: at or above the threshold; below_threshold: below it, which is not reassurance")
    statement: str = Field(description="the result's sentence as the page shows it")
    validation: Position | None = Field(description="null when the bundle holds no validation distribution")


class Prediction(BaseModel):
    outputs: list[OutputScore]
    engine: str = Field(description="onnx (ONNX Runtime) or torch")
    seconds: float = Field(description="server time to read and score the file")


class Saliency(BaseModel):
    output: str
    image: str | None = Field(description="Grad-CAM map as a transparent PNG data URL, the network view's size")
    note: str | None = Field(None, description="why there is no map (no spatial last layer, or a map zero everywhere)")


class Explanation(Prediction):
    network_view: str = Field(description="the image as the network saw it (PNG data URL, gray)")
    source: dict = Field(description="format and display facts of the file (never identifying header values)")
    saliency: list[Saliency]
    saliency_note: str | None


class ErrorBody(BaseModel):
    error: str = Field(description="a stable code: too_large, not_an_image, corrupt_dicom, wrong_kind, ...")
    message: str = Field(description="a sentence for the person who sent the file")


_ERRORS = {s: {"model": ErrorBody} for s in (400, 408, 413, 415, 422, 500)}
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "string", "format": "binary",
                           "description": "one PNG, JPEG or DICOM file (NIfTI for a 3D bundle); kept in memory only"}},
}}}}}


def create_app(bundle: Bundle | str | Path, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, engine: str = "auto",
               concurrency: int = 2, allowed_hosts: list[str] | None = None,
               upload_timeout_s: float = UPLOAD_TIMEOUT_S) -> FastAPI:
    """The application for one bundle. `concurrency` bounds the files scored at once (the
    rest wait their turn); `allowed_hosts` (e.g. the loopback names) guards against DNS
    rebinding when set; an upload that sends nothing for `upload_timeout_s` seconds is
    answered 408 and its connection closed."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    scorer = Scorer(bundle, engine)
    max_upload = int(max_upload_mb * 2**20)
    card = model_card(bundle.info, scorer.validation, bundle.spatial_dims, scorer.engine, max_upload,
                      bundle.intensity_notice)
    limiter = anyio.CapacityLimiter(max(1, concurrency))
    app = FastAPI(
        title=f"stagewise serve: {bundle.info['recipe']}", version=__version__,
        description="Scores one image per request with an exported stagewise bundle. Research use only. Uploads are "
                    "processed in memory and never stored.",
        docs_url=None, redoc_url=None,
    )
    app.state.scorer, app.state.card = scorer, card
    allowed = {h.strip("[]").lower() for h in allowed_hosts} if allowed_hosts else None
    _add_headers(app, allowed)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_info_routes(app, bundle, scorer, card, max_upload)
    _add_scoring_routes(app, scorer, max_upload, limiter, upload_timeout_s)
    _add_docs(app)
    return app


def _add_headers(app: FastAPI, allowed: set[str] | None) -> None:
    """Every answer's security headers (CSP, no sniffing, no referrer, no caching but for static
    assets), and, with `allowed` hosts, a refusal of any other Host (DNS rebinding)."""

    @app.middleware("http")
    async def headers(request: Request, call_next):
        if allowed is not None and _host_name(request.headers.get("host", "")) not in allowed:
            # a page elsewhere reaching this server through a rebound DNS name
            return JSONResponse({"error": "bad_host", "message": "This server answers requests to its own address only."},
                                status_code=400)
        response = await call_next(request)
        docs = request.url.path.startswith(("/docs", "/swagger"))
        response.headers["Content-Security-Policy"] = _DOCS_CSP if docs else _PAGE_CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if not request.url.path.startswith(("/static", "/swagger")):
            response.headers["Cache-Control"] = "no-store"
        return response


def _add_info_routes(app: FastAPI, bundle: Bundle, scorer: Scorer, card: dict, max_upload: int) -> None:
    """The page and what it shows besides a score: health, model card, validation distribution."""

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", summary="Is the server up, and which model does it serve")
    async def health() -> dict:
        return {"status": "ok", "model": bundle.info["recipe"], "outputs": [t["output"] for t in scorer.tasks],
                "engine": scorer.engine, "max_upload_bytes": max_upload, "stagewise": __version__}

    @app.get("/model-card", summary="What the model was trained on and how, how it was validated (with the figures at its "
                          "threshold), what it is for")
    async def get_model_card() -> dict:
        return card

    @app.get("/validation", summary="The out-of-fold validation probabilities and labels, per output")
    async def validation() -> dict:
        outs = (scorer.validation or {}).get("outputs", {})
        return {"available": bool(outs),
                "outputs": {o: {"probability": v["probability"], "label": v["label"]} for o, v in outs.items()}}


def _add_scoring_routes(app: FastAPI, scorer: Scorer, max_upload: int, limiter: anyio.CapacityLimiter,
                        upload_timeout_s: float) -> None:
    """POST /predict and /explain: read the upload, score it in a worker thread (at most
    `limiter` at once, the event loop stays free), answer problems as plain sentences."""

    async def run(request: Request, explain: bool):
        started = time.perf_counter()
        try:
            data, name = await read_upload(request, max_upload, upload_timeout_s)
            result = await anyio.to_thread.run_sync(partial(_work, scorer, data, name, explain), limiter=limiter)
        except Problem as problem:
            # a stalled upload's connection is closed with the answer, not kept open for its rest
            headers = {"Connection": "close"} if problem.status == 408 else None
            return JSONResponse(problem.body(), status_code=problem.status, headers=headers)
        except Exception as err:  # never a trace to the client; the log gets the type and frames, not the message
            frames = "".join(traceback.format_tb(err.__traceback__))
            log.error("internal error while scoring (%s):\n%s", type(err).__name__, frames)
            return JSONResponse({"error": "internal", "message": "The server could not score this file because of an "
                                 "internal error; see the server console."}, status_code=500)
        result["seconds"] = round(time.perf_counter() - started, 4)
        return result

    @app.post("/predict", response_model=Prediction, responses=_ERRORS, openapi_extra=_UPLOAD_BODY,
              summary="Score one image: probability, decision and threshold per output")
    async def predict(request: Request):
        return await run(request, explain=False)

    @app.post("/explain", response_model=Explanation, responses=_ERRORS, openapi_extra=_UPLOAD_BODY,
              summary="Score one image and show why: the network's view and a Grad-CAM map per output")
    async def explain(request: Request):
        return await run(request, explain=True)


def _host_name(host: str) -> str:
    """The name of a Host header, without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _work(scorer: Scorer, data: bytes, name: str, explain: bool) -> dict:
    scored = scorer.score(scorer.read(data, name))
    outputs = scorer.outputs(scored.probabilities)
    out = {"outputs": [o | output_wording(t, o) for t, o in zip(scorer.tasks, outputs)], "engine": scorer.engine}
    if explain:
        out["network_view"] = png_data_url(scored.view)
        out["source"] = scored.source
        maps = scorer.saliency(scored) if scored.tensor.dim() == 4 else [None] * len(scorer.tasks)
        out["saliency"] = [{"output": t["output"], "image": None if heatmap_note(m) else heatmap_data_url(m),
                            "note": heatmap_note(m)} for t, m in zip(scorer.tasks, maps)]
        out["saliency_note"] = overall_note(maps)
    return out


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the local swagger-ui-bundle copy (FastAPI's default loads it
    from a CDN, which a hospital workstation may not reach); without the package, /docs is
    off and /openapi.json stays."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title=f"{app.title}: API",
            swagger_js_url="/swagger/swagger-ui-bundle.js", swagger_css_url="/swagger/swagger-ui.css",
            swagger_favicon_url="/swagger/favicon-32x32.png", swagger_ui_parameters={"validatorUrl": None},
        )
