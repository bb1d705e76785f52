"""`fashion-cnn serve`: a trained run behind a JSON API and one web page, on FastAPI + uvicorn.

    GET  /                    the page: drop photos, see the input the model saw, the top-k
                              bars and the Grad-CAM heatmap; the run's figures on a second tab
    POST /api/predict         images as multipart file fields -> JSON, one result per file
    GET  /api/model           run name, classes, parameters, test accuracy, input shape, limits
    GET  /api/figures/{name}  one of the run's figures (analysis.plots.RUN_FIGURES), PNG
    GET  /healthz             {"status": "ok"}
    GET  /docs                OpenAPI docs (FastAPI's; that page loads Swagger UI from a CDN)

Safe by default: bound to 127.0.0.1; every upload streamed into a private temporary folder
that is removed after its request (apps.uploads), within `Limits`; each image read by
predict's own path (apps.predict.image_input: special files refused, the pixel budget checked
from the header before decoding). The model is loaded once; the requests' decoding runs in
parallel threads, the model itself behind a lock. docs/serve.md describes the API.

>>> app = create_app("runs/fast-20261203-101500")                       # doctest: +SKIP
>>> serve("runs/fast-20261203-101500", port=8000)                       # doctest: +SKIP
"""

import ipaddress
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from ..errors import UserError, first_line
from .predict import INVERT_CHOICES
from .serve_model import Busy, ServedModel
from .uploads import RequestRejected, describe_bytes, read_multipart

PAGE = ("web", "index.html")  # package data of fashion_cnn.apps
# Multipart framing per file (boundary, Content-Disposition, Content-Type) and the text fields:
# the body may exceed max_files x max_file_bytes by this much.
BODY_OVERHEAD = 64 * 1024  # bytes
FORM_FIELDS = ("explain", "top_k", "invert")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
SERVE_INSTALL = "pip install 'fashion-cnn[serve]'"
# The page allows only itself: its own inline style and script, images from data: and blob:
# URLs (results, previews) and its own origin (figures), requests to its own origin. A page
# that tried to load anything else would be blocked by the browser, not only by its author.
PAGE_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
               "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
               "form-action 'none'; frame-ancestors 'none'")
COMMON_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                  (b"x-frame-options", b"DENY")]


@dataclass(frozen=True)
class Limits:
    """What one request may send; every one is an argument of create_app and serve.

    >>> Limits(max_file_bytes=2 << 20, max_files=4)                      # doctest: +SKIP
    """

    max_file_bytes: int = 10 << 20     # bytes per uploaded file (10 MiB)
    max_files: int = 16                # image files per request
    max_pixels: int | None = None      # width x height per image; None: data.images' budget
    request_seconds: float = 30.0      # seconds from a request's start to its answer
    max_connections: int = 128         # concurrent connections uvicorn accepts; more get 503

    def __post_init__(self):
        for name in ("max_file_bytes", "max_files", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name}={value!r}: must be a whole number of at least 1",
                                setting=name)
        if self.max_pixels is not None and (not isinstance(self.max_pixels, int)
                                            or self.max_pixels < 1):
            raise UserError(f"max_pixels={self.max_pixels!r}: must be a whole number of "
                            f"pixels of at least 1", setting="max_pixels")
        seconds = self.request_seconds
        if not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
            raise UserError(f"request_seconds={seconds!r}: must be a positive number of "
                            f"seconds", setting="request_seconds")

    @property
    def max_body_bytes(self) -> int:
        return self.max_files * self.max_file_bytes + (self.max_files + 1) * BODY_OVERHEAD


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve to anything


def _flag(name: str, text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise RequestRejected(422, f"{name}={text[:40]!r}: expected true or false")


def _settings(query, fields: dict, classes: int) -> tuple[int, bool, str]:
    """top_k, explain and invert from the query string and the form's text fields (either may
    hold each; both only where they agree)."""
    given = {}
    for name in FORM_FIELDS:
        values = {v for v in (query.get(name), fields.get(name)) if v is not None}
        if len(values) > 1:
            raise RequestRejected(422, f"{name} given twice with different values "
                                  f"({' and '.join(sorted(values))[:80]})")
        given[name] = values.pop() if values else None
    top_k = 3
    if given["top_k"] is not None:
        try:
            top_k = int(given["top_k"])
        except ValueError:
            top_k = 0
        if not 1 <= top_k <= classes:
            raise RequestRejected(422, f"top_k={given['top_k'][:40]!r}: expected a whole "
                                  f"number from 1 to {classes}")
    explain = _flag("explain", given["explain"]) if given["explain"] is not None else False
    invert = given["invert"] if given["invert"] is not None else "auto"
    if invert not in INVERT_CHOICES:
        raise RequestRejected(422, f"invert={invert[:40]!r}: expected one of "
                              f"{', '.join(INVERT_CHOICES)}")
    return top_k, explain, invert


def _answer_status(results: list[dict]) -> int:
    """200 when at least one image was predicted; otherwise the files' own status where they
    all share one (413, 415, 422, 400), else 400."""
    if any("error" not in r for r in results):
        return 200
    statuses = {r["status"] for r in results}
    return statuses.pop() if len(statuses) == 1 else 400


def _json_error(status: int, message: str, **extra):
    """The one shape of every error answer: {"error": "...", ...}, never cached."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message, **extra}, status_code=status,
                        headers={"cache-control": "no-store"})


def create_app(run_dir: str | os.PathLike, *, checkpoint: str | None = None,
               device: str | None = None, limits: Limits | None = None,
               threads: int | None = None, allowed_hosts: list[str] | None = None):
    """The FastAPI app serving the run at `run_dir` (its final weights, or `checkpoint`) on
    `device` (default: the run's own, or the CPU), with `limits` (Limits()) and `threads`
    torch threads (serve_model.default_threads()). The model is loaded here, once; UserError where the
    run cannot be loaded. `allowed_hosts`: the Host headers answered (others get 400), as
    serve() sets for a loopback address, so that a web page whose name is made to resolve to
    127.0.0.1 (DNS rebinding) cannot read the API; None: any.

    >>> from fastapi.testclient import TestClient                        # doctest: +SKIP
    >>> TestClient(create_app("runs/fast")).get("/api/model").json()["classes"][:2]  # doctest: +SKIP
    ['T-shirt/top', 'Trouser']
    """
    from ..errors import require_module

    require_module("fastapi", "fashion-cnn serve", SERVE_INSTALL)
    require_module("python_multipart", "fashion-cnn serve", SERVE_INSTALL)
    from fastapi import FastAPI

    limits = limits or Limits()
    service = ServedModel(run_dir, checkpoint, device, max_pixels=limits.max_pixels,
                          threads=threads)
    app = FastAPI(title=f"fashion-cnn serve: {service.info['run']}", redoc_url=None,
                  description="Predict with a trained fashion-cnn run; see docs/serve.md.")
    _add_error_handlers(app)
    _add_read_routes(app, service, limits)
    _add_predict_route(app, service, limits)
    app.add_middleware(_SafetyHeaders)
    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    return app


def _add_error_handlers(app) -> None:
    """Every error, the framework's included, answered as _json_error's one-line JSON."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no such page: {request.url.path[:200]}"
        return _json_error(exc.status_code, detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _json_error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # logged by uvicorn; the client gets one line
        return _json_error(500, f"internal error ({type(exc).__name__})")


def _add_read_routes(app, service: ServedModel, limits: Limits) -> None:
    """GET /, /healthz, /api/model and /api/figures/{name}."""
    from fastapi.responses import HTMLResponse, Response

    info = {**service.info, "limits": {**asdict(limits), "max_pixels": service.max_pixels,
                                       "max_body_bytes": limits.max_body_bytes}}
    page = resources.files(__package__).joinpath(*PAGE).read_text(encoding="utf-8")

    # async: answered on the event loop, never queued behind predictions waiting for the
    # model in worker threads
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"content-security-policy": PAGE_POLICY,
                                           "cache-control": "no-cache"})

    @app.get("/healthz", summary="Liveness: the app is up and its model is loaded")
    async def healthz():
        return {"status": "ok"}

    @app.get("/api/model", summary="The run: name, classes, parameters, accuracy, limits")
    async def model_info():
        return {**info, "figures": service.figures()}

    @app.get("/api/figures/{name}", summary="One of the run's figures (PNG)",
             responses={200: {"content": {"image/png": {}}}, 404: {}})
    def figure(name: str):
        try:
            data = service.figure(name)
        except UserError as exc:
            return _json_error(500, str(exc).replace(str(service.run.path), name))
        if data is None:
            from ..analysis.plots import RUN_FIGURES

            return _json_error(404, f"no figure {name[:80]!r} in this run (the run's figures: "
                               f"{', '.join(service.figures()) or 'none'}; known names: "
                               f"{', '.join(RUN_FIGURES)})")
        return Response(data, media_type="image/png", headers={"cache-control": "no-cache"})


def _upload_schema(limits: Limits) -> dict:
    """The OpenAPI description of /api/predict's multipart body (read by hand, not declared)."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                     "description": f"image files (any field name), at most "
                                    f"{limits.max_files}, {describe_bytes(limits.max_file_bytes)} "
                                    f"each"},
            "explain": {"type": "boolean"}, "top_k": {"type": "integer"},
            "invert": {"type": "string", "enum": list(INVERT_CHOICES)}}}}}}}


async def _read_request(request, folder: Path, limits: Limits, deadline: float, classes: int):
    """The request's uploads (written into `folder`) and settings: (form, (top_k, explain,
    invert)); raises RequestRejected (4xx) for a request that cannot be served."""
    import anyio
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise RequestRejected(413, f"the request body is {describe_bytes(int(declared))}, "
                              f"more than {describe_bytes(limits.max_body_bytes)} "
                              f"({limits.max_files} files of "
                              f"{describe_bytes(limits.max_file_bytes)} at most)")
    try:
        with anyio.fail_after(max(0.0, deadline - time.monotonic())):
            form = await read_multipart(
                request.headers.get("content-type"), request.stream(), folder,
                max_files=limits.max_files, max_file_bytes=limits.max_file_bytes,
                max_body_bytes=limits.max_body_bytes, fields=FORM_FIELDS)
        if time.monotonic() > deadline:  # the last chunk came in after it
            raise TimeoutError
    except ClientDisconnect:
        raise RequestRejected(400, "the client disconnected during the upload") from None
    except TimeoutError:
        raise RequestRejected(408, f"the upload took longer than the request time limit of "
                              f"{limits.request_seconds:g} s") from None
    settings = _settings(request.query_params, form.fields, classes)
    if not form.uploads:
        raise RequestRejected(400, "no image in the request: send each image as a multipart "
                              "file field (curl -F file=@shirt.jpg)")
    return form, settings


def _add_predict_route(app, service: ServedModel, limits: Limits) -> None:
    """POST /api/predict: read the uploads into a private temporary folder (always removed),
    predict them in a worker thread (the model's lock serializes them), answer JSON."""
    import anyio
    from fastapi import Query, Request
    from fastapi.responses import JSONResponse

    name, classes = service.info["run"], len(service.info["classes"])

    @app.post("/api/predict", openapi_extra=_upload_schema(limits),
              summary="Classify uploaded images; explain=true adds Grad-CAM overlays")
    async def predict(request: Request,
                      top_k: str | None = Query(None, description="classes per image, 1 to "
                                                "the number of classes (default 3)"),
                      explain: str | None = Query(None, description="true: add a Grad-CAM "
                                                  "overlay per image"),
                      invert: str | None = Query(None, description="auto, yes or no: "
                                                 "negate a photo to a light garment on black")):
        deadline = time.monotonic() + limits.request_seconds
        folder = tempfile.TemporaryDirectory(prefix="fashion-cnn-serve-")
        try:
            try:
                form, (top, explain_on, invert_mode) = await _read_request(
                    request, Path(folder.name), limits, deadline, classes)
            except RequestRejected as exc:
                return _json_error(exc.status, exc.message)
            if explain_on and not service.info["explain"]:
                return _json_error(422, "explain=true needs a model with a Conv2D layer "
                                   "(Grad-CAM); this run's model has none")
            try:
                results = await anyio.to_thread.run_sync(
                    service.predict, form.uploads, top, explain_on, invert_mode, deadline)
            except Busy:
                return JSONResponse(
                    {"error": f"the server is busy: the request was not served within its "
                              f"time limit of {limits.request_seconds:g} s; try again"},
                    status_code=503, headers={"retry-after": "1", "cache-control": "no-store"})
            except UserError as exc:  # Grad-CAM refusing this model
                return _json_error(422, first_line(exc))
        finally:
            # here, not awaited: a cancelled request still removes its files
            folder.cleanup()
        results = [{"index": index, **result} for index, result in enumerate(results)]
        status = _answer_status(results)
        body = {"run": name, "top_k": top, "explain": explain_on, "results": results,
                "errors": sum("error" in r for r in results)}
        if status != 200:
            body["error"] = "no usable image: " + "; ".join(r["error"] for r in results)[:2000]
        return JSONResponse(body, status_code=status, headers={"cache-control": "no-store"})


class _SafetyHeaders:
    """ASGI middleware: the common safety headers on every HTTP response (no MIME sniffing, no
    referrer, no framing). Pure ASGI, so streaming responses stay streamed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *COMMON_HEADERS]}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def serve(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *,
          checkpoint: str | None = None, device: str | None = None,
          limits: Limits | None = None, threads: int | None = None,
          log_level: str = "info") -> None:
    """Serve the run at `run_dir` on http://host:port until interrupted (Ctrl-C). A host other
    than a loopback address makes the model reachable from other machines, without any
    authentication: a warning says so on stderr.

    >>> serve("runs/fast-20261203-101500", port=8000)                   # doctest: +SKIP
    """
    from ..errors import require_module

    require_module("uvicorn", "fashion-cnn serve", SERVE_INSTALL)
    import uvicorn

    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"port={port!r}: must be a port number from 0 to 65535", setting="port")
    limits = limits or Limits()
    # on a loopback address, only requests naming it (a browser sends the name it resolved)
    hosts = (sorted({"localhost", "127.0.0.1", "[::1]", host.strip()}) if is_loopback(host)
             else None)
    app = create_app(run_dir, checkpoint=checkpoint, device=device, limits=limits,
                     threads=threads, allowed_hosts=hosts)
    if not is_loopback(host):
        print(f"warning: serving on {host}:{port} makes the model, its run's figures and the "
              f"upload endpoint reachable from other machines, with no authentication; "
              f"use --host 127.0.0.1 to keep it on this machine", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False,
                limit_concurrency=limits.max_connections, timeout_keep_alive=5)
