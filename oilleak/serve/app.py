"""The HTTP API and the page, over one loaded model and its inference pool.

Every answer that is not a success is JSON ``{"error": code, "message": what to do}``, never a traceback;
an exception in one request is logged and answered with 500, and the server goes on. The :class:`Gate`
in front of the app refuses work before the body is read when it cannot be done (API key, shutting down,
too many requests inside, queue full, body too large) and writes one JSON access-log line per request,
with its request id (the client's X-Request-ID, or one made up; echoed back). The endpoints then hold each
photo's pixels against the :class:`~oilleak.serve.admission.PixelBudget` from its header on, and refuse a
request whose model passes (tiles) exceed the limit. No CORS headers unless origins are configured; no
/docs page (its assets would come from a CDN): the schema is at /openapi.json.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Annotated, Any, Optional

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from oilleak.predict.backends import Found
from oilleak.predict.detector import Detector
from oilleak.visualize import palette
from oilleak.serve.admission import RETRY_AFTER_S, PixelBudget, too_many_passes
from oilleak.serve.pool import InferencePool, QueueFull
from oilleak.serve.settings import MIN_TILE, ServeSettings
from oilleak.serve.uploads import UploadError, decode_upload, open_upload

STATIC = Path(__file__).parent / "static"
access_log = logging.getLogger("oilleak.serve.access")
error_log = logging.getLogger("oilleak.serve")

ERROR_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "too_large", 415: "unsupported_media_type", 422: "invalid_request", 500: "internal_error",
               503: "unavailable"}
POOL_CLOSE_S = 5.0  # at exit, how long to wait for a worker still inside a model pass
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and headers around the files of a request
KEYED_PATHS = ("/predict", "/classes")
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")  # what a client's X-Request-ID may be to be logged as is

# The query parameters of both /predict endpoints (module level: FastAPI resolves the annotations by name)
ScoreThr = Annotated[Optional[float], Query(ge=0.0, le=1.0, description="keep instances scoring at least this (default: the checkpoint's predict.score_thr)")]
Tile = Annotated[Optional[int], Query(ge=MIN_TILE, le=8192, description="predict in TILE x TILE tiles (20% overlap) and merge: very large photos; the tiles of a request count against the server's --max-passes")]
Overlay = Annotated[bool, Query(description="add overlay_png: the photo with the leaks drawn, PNG in base64")]


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": ERROR_CODES.get(status, "error"), "message": message}, status, headers=headers)


def busy(message: str) -> JSONResponse:
    return error(503, message, {"Retry-After": RETRY_AFTER_S})


def key_given(headers, settings: ServeSettings) -> bool:
    """Whether a request may see what the key protects: the server has no key, or the request has it."""
    if not settings.api_key:
        return True
    given = headers.get(b"x-api-key", b"") if isinstance(headers, dict) else headers.get("x-api-key", "").encode()
    return hmac.compare_digest(given, settings.api_key.encode())


class Gate:
    """ASGI middleware: API key, admission and body size before the app reads anything; the access log."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        given_id = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = given_id.decode() if REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex[:12]
        status = {"code": 0}
        counted = False

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_logged)
            else:
                counted = scope["method"] == "POST" and scope["path"].startswith("/predict")
                self.state.requests_inside += counted
                await self.app(scope, self.limited(scope, receive), send_logged)
        except Exception:
            status["code"] = status["code"] or 500  # the error middleware outside answers it, with 500
            raise
        finally:
            self.state.requests_inside -= counted
            self.state.requests_served += 1
            client = scope.get("client") or ("", 0)
            access_log.info(json.dumps({
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "request_id": request_id,
                "client": client[0], "method": scope["method"], "path": scope["path"], "status": status["code"],
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            }))

    def refusal(self, scope) -> JSONResponse | None:
        path, settings = scope["path"], self.state.settings
        if path.startswith(KEYED_PATHS) and not key_given(dict(scope["headers"]), settings):
            return error(401, "this server needs an API key: send it in the X-API-Key header")
        if scope["method"] == "POST" and path.startswith("/predict"):
            if self.state.draining:
                return busy("the server is shutting down; send the request to another instance or retry shortly")
            if self.state.requests_inside >= settings.max_requests:
                return busy(f"the server is busy with {self.state.requests_inside} requests (--max-requests "
                            f"{settings.max_requests}); retry shortly")
            if self.state.pool.full():
                return busy(f"the inference queue is full ({self.state.pool.queue_size} images wait); retry shortly")
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.body_limit(path):
                return error(413, self.too_large(path))
        return None

    def body_limit(self, path: str) -> int:
        images = self.state.settings.max_images if path.startswith("/predict/batch") else 1
        return images * self.state.settings.max_upload_bytes + MULTIPART_OVERHEAD

    def too_large(self, path: str) -> str:
        settings = self.state.settings
        per = f"{settings.max_upload_mb:g} MiB per image"
        return f"the request is too large: {per}" + (f", {settings.max_images} images per request" if "batch" in path else "")

    def limited(self, scope, receive):
        """``receive`` that stops a body (chunked ones too) at the limit instead of storing all of it."""
        if scope["method"] != "POST":
            return receive
        limit, seen = self.body_limit(scope["path"]), 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, self.too_large(scope["path"]))
            return message

        return receive_limited


class ServerState:
    def __init__(self, model: Detector, settings: ServeSettings):
        self.model = model
        self.settings = settings
        self.started = time.monotonic()
        self.requests_served = 0
        self.requests_inside = 0  # /predict* requests admitted by the Gate and not answered yet
        self.draining = False
        self.pixels = PixelBudget(settings.pixel_budget)
        self.pool = InferencePool(model.predict_arrays, workers=settings.workers, queue=settings.queue,
                                  max_batch=settings.max_batch, batch_wait_s=settings.batch_wait_ms / 1000)

    def begin_shutdown(self) -> None:
        """Refuse new work now; after the grace period, answer the images still waiting with 503."""
        if self.draining:
            return
        self.draining = True
        timer = threading.Timer(self.settings.grace_s, self.pool.cancel)
        timer.daemon = True
        timer.start()


def answer(model: Detector, name: str, image: np.ndarray, found: Found, score_thr: float, overlay: bool) -> dict[str, Any]:
    """The JSON of one image: the model, then the record `oilleak predict` writes to instances/NAME.json."""
    result = model.result(image, found, score_thr, source=name)
    payload = {"model": model.info, **result.to_dict()}
    if overlay:
        buffer = io.BytesIO()
        Image.fromarray(result.plot()).save(buffer, "PNG")
        payload["overlay_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return payload


def create_app(model: Detector, settings: ServeSettings) -> FastAPI:
    state = ServerState(model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has answered the requests in flight by now, or given up on them after its timeout
        state.pool.cancel()
        await run_in_threadpool(state.pool.close, POOL_CLOSE_S)

    app = FastAPI(title="oilleak", summary="Find and outline oil leaks in substation photos",
                  version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.oilleak = state

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error(422, f"{problems} (the API: /openapi.json)")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        error_log.exception("request %s %s failed", request.method, request.url.path)
        return error(500, f"the server failed on this request ({type(exc).__name__}); it is logged, the server goes on")

    def threshold(score_thr: float | None) -> float:
        return model.score_thr if score_thr is None else score_thr

    async def opened(upload: UploadFile) -> tuple[str, Image.Image]:
        """The photo's name and its header read, its pixels not decoded yet (UploadError if it is refused)."""
        name = PurePath(upload.filename or "upload").name
        data = await upload.read()
        return name, await run_in_threadpool(open_upload, data, name, settings.max_upload_bytes, settings.max_pixels)

    def check_passes(images: list[Image.Image], tile: int | None) -> None:
        problem = too_many_passes([image.size for image in images], tile, settings.max_passes)
        if problem is not None:
            raise HTTPException(422, problem)

    async def predicted(images: list[np.ndarray], tile: int | None, score_thr: float) -> list[Found]:
        try:
            futures = state.pool.submit(images, tile, score_thr)
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except QueueFull as exc:  # at submission, or the server stopped before the images' turn
            raise HTTPException(503, f"busy: {exc}; retry shortly", headers={"Retry-After": RETRY_AFTER_S}) from None

    @app.post("/predict", summary="Leaks in one photo (multipart field `image`)")
    async def predict(image: Annotated[UploadFile, File(description="JPEG, PNG, BMP, TIFF or WebP")],
                      score_thr: ScoreThr = None, tile: Tile = None, overlay: Overlay = False) -> dict:
        try:
            name, header = await opened(image)
        except UploadError as exc:
            return error(exc.status, exc.message)
        check_passes([header], tile)
        with state.pixels.hold(header.width * header.height):
            try:
                pixels = await run_in_threadpool(decode_upload, header, name)
            except UploadError as exc:
                return error(exc.status, exc.message)
            (found,) = await predicted([pixels], tile, threshold(score_thr))
            return await run_in_threadpool(answer, model, name, pixels, found, threshold(score_thr), overlay)

    @app.post("/predict/batch", summary="Leaks in several photos (multipart fields `images`)")
    async def predict_batch(images: Annotated[list[UploadFile], File(description="the photos")],
                            score_thr: ScoreThr = None, tile: Tile = None, overlay: Overlay = False) -> dict:
        if len(images) > settings.max_images:
            return error(413, f"{len(images)} images: at most {settings.max_images} per request; split them")
        results: list[dict | None] = [None] * len(images)

        def refused(k: int, exc: UploadError) -> None:  # one bad photo does not spoil the others
            results[k] = {"source": PurePath(images[k].filename or "upload").name, "error": ERROR_CODES[exc.status],
                          "status": exc.status, "message": exc.message}

        headers: list[tuple[int, str, Image.Image]] = []
        for k, upload in enumerate(images):
            try:
                headers.append((k, *await opened(upload)))
            except UploadError as exc:
                refused(k, exc)
        check_passes([header for _, _, header in headers], tile)
        with state.pixels.hold(sum(header.width * header.height for _, _, header in headers)):
            good: list[tuple[int, str, np.ndarray]] = []
            for k, name, header in headers:
                try:
                    good.append((k, name, await run_in_threadpool(decode_upload, header, name)))
                except UploadError as exc:
                    refused(k, exc)
            found = await predicted([pixels for _, _, pixels in good], tile, threshold(score_thr)) if good else []
            for (k, name, pixels), each in zip(good, found):
                results[k] = await run_in_threadpool(answer, model, name, pixels, each, threshold(score_thr), overlay)
        return {"model": model.info, "results": results}

    @app.get("/health", summary="Ready or not and the uptime; with the API key, the model and the queue too")
    async def health(request: Request) -> JSONResponse:
        body: dict[str, Any] = {"ready": not state.draining, "status": "draining" if state.draining else "ready",
                                "uptime_s": round(time.monotonic() - state.started, 1)}
        if key_given(request.headers, settings):  # what the server runs is the key's to show
            pool = state.pool
            body |= {"model": model.info, "classes": model.classes, "device": str(model.device),
                     "requests_served": state.requests_served, "requests_inside": state.requests_inside,
                     "images_predicted": pool.images,
                     "megapixels_in_flight": round(state.pixels.used / 1e6, 3),
                     "pool": {"workers": settings.workers, "queue": settings.queue, "waiting": pool.waiting,
                              "running": pool.running, "max_batch": settings.max_batch, "batches": pool.batches},
                     "api_key_required": settings.api_key is not None}
        return JSONResponse(body, 503 if state.draining else 200)

    @app.get("/classes", summary="The model, its classes and the colours the overlays draw them in")
    async def classes() -> dict:
        colours = [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in palette(len(model.classes))]
        return {"model": model.info, "classes": model.classes, "colours": colours}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Gate, state=state)
    if settings.cors_origins:  # outside the Gate: a browser's preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "X-Request-ID"], expose_headers=["X-Request-ID", "Retry-After"])
    return app
