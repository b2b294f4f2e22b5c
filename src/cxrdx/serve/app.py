"""The web service: FastAPI over a predictor, with hardened uploads and a bounded inference queue.

Access (allowed Host names, rate limit, API key) is checked first, by `cxrdx.serve.guard`. A
request is then admitted before any byte of its body is read: at most `queue_size` requests and
`max_inflight_bytes` of their declared bodies at once, the rest get 503 with Retry-After, so the
memory held by uploads is bounded in total, not only per request. Uploads are read into memory
only (never spooled to disk, never logged), within `body_timeout_s`, typed by their first bytes
(PNG, JPEG, DICOM Part 10), and decoded and predicted on one worker thread so the event loop stays
free; the decoder refuses images whose header announces more than `max_decoded_bytes` of pixels.
Values of the DICOM patient module are scrubbed from every message and decoder warnings are
silenced, so no header value reaches a response or the log.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from cxrdx import __version__
from cxrdx.card import served_card
from cxrdx.errors import ImageReadError
from cxrdx.jsonsafe import to_json_safe
from cxrdx.predict import BasePredictor
from cxrdx.serve.guard import AccessGuard
from cxrdx.serve.settings import ServeSettings, read_api_key
from cxrdx.uploads import UPLOAD_NAME, MultipartFile, RawBody, UploadError, decode_upload, sniff

log = logging.getLogger("cxrdx.serve")
T = TypeVar("T")

RETRY_AFTER_S = 2
MULTIPART_SLACK = 16 * 2**10  # boundary and part headers around the file
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "PNG, JPEG or DICOM"}},
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "empty or malformed upload, or a Host name that is not served"},
    401: {"description": "API key missing or wrong (when the service has one)"},
    408: {"description": "the upload did not arrive within the body timeout"},
    413: {"description": "upload larger than the limit"},
    415: {"description": "not PNG, JPEG or DICOM (judged by content)"},
    422: {"description": "an image that cannot be decoded (or too large once decoded), refused by the input guard, or a bad parameter"},
    429: {"description": "rate limit of this client reached; see Retry-After"},
    503: {"description": "inference queue or upload memory budget full; see Retry-After"},
}


class PredictResponse(BaseModel):
    model: str = Field(description="the network, e.g. resnet50")
    backend: str = Field(description="pytorch or onnxruntime")
    cxrdx_version: str
    probabilities: dict[str, float] = Field(description="the 14 findings in canonical order")
    thresholds: dict[str, float] = Field(description="decision threshold of each finding")
    positives: list[str] = Field(description="findings whose probability reaches their threshold")
    ood_score: float | None = Field(None, description="the input guard's out-of-distribution score (absent: guard off)")
    image: str | None = Field(None, description="with ?image=true: the model's view of the image, PNG data URL")


def create_app(predictor: BasePredictor, settings: ServeSettings | None = None, **changes: Any) -> FastAPI:
    """The service around one predictor (PyTorch `Predictor` or `OnnxPredictor`).

    `changes` replace single fields of `settings` (default `ServeSettings()`), e.g. `queue_size=4`.
    """
    settings = dataclasses.replace(settings or ServeSettings(), **changes)
    max_upload_bytes = settings.max_upload_bytes
    queue = InferenceQueue(settings.queue_size, settings.max_inflight_bytes)
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings may quote header values, patient fields included

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        queue.close()

    app = FastAPI(
        title="cxrdx",
        version=__version__,
        summary="Fourteen chest X-ray findings from one radiograph, with heatmaps.",
        lifespan=lifespan,
    )
    app.state.predictor, app.state.queue, app.state.settings = predictor, queue, settings
    page = resources.files("cxrdx.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    info = predictor.info
    card = served_card(predictor)  # once: it hashes nothing, but reads the training cache's description
    app.add_middleware(AccessGuard, settings=settings)  # added first: runs inside the access log

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        log.info("%s %s %d %.0f ms", request.method, request.url.path, response.status_code, 1e3 * (time.perf_counter() - start))
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", summary="Liveness: the model is loaded and the queue is open")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": info.model_name, "backend": predictor.backend, "queue": queue.state()}

    @app.get("/v1/model", summary="The model: findings, input size, thresholds, validation metrics")
    async def model_card() -> dict[str, Any]:
        return to_json_safe(
            {
                "model": info.model_name,
                "backend": predictor.backend,
                "findings": info.findings,
                "input_size": info.input_size,
                "cache_size": info.cache_size,
                "mean": info.mean,
                "std": info.std,
                "thresholds": predictor.thresholds,
                "temperature": info.temperature,
                "val_metrics": info.val_metrics,
                "input_guard": predictor.guard_status,
                "trained_with_cxrdx": info.cxrdx_version,
                "cxrdx_version": __version__,
                "explain": {"available": _can_explain(predictor), "methods": _methods() if _can_explain(predictor) else []},
                "max_upload_bytes": max_upload_bytes,
                "max_decoded_bytes": settings.max_decoded_bytes,
                "max_inflight_bytes": settings.max_inflight_bytes,
                "rate_limit_per_minute": settings.rate_per_minute,
                "card": card,
            }
        )

    @app.post(
        "/v1/predict",
        summary="Probabilities of the 14 findings for one image",
        openapi_extra=UPLOAD_BODY,
        responses=ERRORS,
        response_model=PredictResponse,
        response_model_exclude_none=True,
    )
    async def predict(
        request: Request,
        image: bool = Query(False, description="also return the model's view of the image as a PNG data URL"),
    ) -> dict[str, Any]:
        with queue.admit(reservation(request, max_upload_bytes)) as admission:
            data = await read_upload(request, max_upload_bytes, settings.body_timeout_s)
            result = await admission.run(_predict_job, predictor, data, image, settings.max_decoded_bytes)
        return {"model": info.model_name, "backend": predictor.backend, "cxrdx_version": __version__, **result}

    @app.post(
        "/v1/explain",
        summary="Heatmap of one finding over the image, as a PNG",
        openapi_extra=UPLOAD_BODY,
        responses={200: {"content": {"image/png": {}}}, 501: {"description": "ONNX backend: no heatmaps"}, **ERRORS},
        response_class=Response,
    )
    async def explain(
        request: Request,
        finding: str = Query(..., description="one of the 14 findings, e.g. Effusion"),
        method: str = Query("groupcam", description="groupcam or a Grad-CAM-family method"),
    ) -> Response:
        if not _can_explain(predictor):
            raise HTTPException(
                501,
                "heatmaps need the PyTorch checkpoint: Group-CAM and the Grad-CAM family read the network's "
                "activations and gradients, which an ONNX model does not expose; start the service with --checkpoint",
            )
        if finding not in info.findings:
            raise HTTPException(422, f"unknown finding {finding!r}; choose from {', '.join(info.findings)}")
        if method not in _methods():
            raise HTTPException(422, f"unknown method {method!r}; choose from {', '.join(_methods())}")
        with queue.admit(reservation(request, max_upload_bytes)) as admission:
            data = await read_upload(request, max_upload_bytes, settings.body_timeout_s)
            job = (predictor, data, info.findings.index(finding), method, settings.max_decoded_bytes)
            png = await admission.run(_explain_job, *job)
        return Response(png, media_type="image/png")

    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` (several workers): each worker loads the model named by
    CXRDX_SERVE_CHECKPOINT or CXRDX_SERVE_ONNX itself (CXRDX_SERVE_TRUST_PICKLE=1: an old pickle checkpoint too),
    takes its settings from CXRDX_SERVE_SETTINGS (JSON, as `cxrdx serve` writes it; defaults without it) and
    its API key from the file named by CXRDX_SERVE_API_KEY_FILE or from CXRDX_API_KEY."""
    from cxrdx.export import OnnxPredictor
    from cxrdx.predict import Predictor

    env = os.environ
    if env.get("CXRDX_SERVE_ONNX"):
        predictor: BasePredictor = OnnxPredictor.from_file(env["CXRDX_SERVE_ONNX"])
    else:
        predictor = Predictor.from_checkpoint(
            env["CXRDX_SERVE_CHECKPOINT"],
            device=env.get("CXRDX_SERVE_DEVICE", "auto"),
            trust_pickle=env.get("CXRDX_SERVE_TRUST_PICKLE") == "1",
        )
    settings = ServeSettings.from_json(env["CXRDX_SERVE_SETTINGS"], None) if env.get("CXRDX_SERVE_SETTINGS") else ServeSettings()
    return create_app(predictor, settings, api_key=read_api_key(env.get("CXRDX_SERVE_API_KEY_FILE"), env))


class InferenceQueue:
    """One worker thread; at most `capacity` requests admitted (reading, waiting or running) and at
    most `max_bytes` of their bodies reserved at once, else 503 with Retry-After."""

    def __init__(self, capacity: int, max_bytes: int):
        self.capacity, self.max_bytes = capacity, max_bytes
        self.admitted = self.bytes_in_flight = 0
        # One thread: the model is not re-entrant while a CAM method has hooks on it.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrdx-inference")

    def state(self) -> dict[str, int]:
        return {"admitted": self.admitted, "capacity": self.capacity, "bytes_in_flight": self.bytes_in_flight, "max_bytes": self.max_bytes}

    def admit(self, nbytes: int) -> Admission:
        """A slot and `nbytes` of the memory budget, taken before the body is read."""
        if self.admitted >= self.capacity:
            raise _busy(f"{self.admitted} requests are already queued for inference")
        if self.bytes_in_flight + nbytes > self.max_bytes:
            raise _busy(f"{self.bytes_in_flight:,} bytes of uploads are already in memory (budget {self.max_bytes:,})")
        self.admitted += 1
        self.bytes_in_flight += nbytes
        return Admission(self, nbytes)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class Admission:
    """One admitted request. Its slot and bytes are given back once: when its job ends (not when the
    client leaves: the thread and the upload are busy until then), or on leaving the `with` block
    when no job was started."""

    def __init__(self, queue: InferenceQueue, nbytes: int):
        self.queue, self.nbytes = queue, nbytes
        self.job: Future | None = None
        self.released = False

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.job is None:
            self.release()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        self.job = self.queue.executor.submit(fn, *args)
        self.job.add_done_callback(lambda _: loop.call_soon_threadsafe(self.release))
        return await asyncio.wrap_future(self.job)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.queue.admitted -= 1
            self.queue.bytes_in_flight -= self.nbytes


def _busy(why: str) -> HTTPException:
    return HTTPException(503, f"busy: {why}; retry in a moment", headers={"Retry-After": str(RETRY_AFTER_S)})


def reservation(request: Request, limit: int) -> int:
    """Bytes to reserve for this request's body: its Content-Length, or the most it may send.
    A declared length over the limit is refused here, before admission."""
    body_limit = _body_limit(request, limit)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > body_limit:
        raise _too_large(limit)
    return int(declared) if declared.isdigit() else body_limit


def _body_limit(request: Request, limit: int) -> int:
    return limit + MULTIPART_SLACK if _is_multipart(request) else limit


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def read_upload(request: Request, limit: int, timeout_s: float) -> bytearray:
    """The uploaded file's bytes: the `file` part of multipart/form-data, or the raw body, parsed as
    the body arrives so that only the file's bytes are held; 408 when it takes over `timeout_s`."""
    body_limit = _body_limit(request, limit)
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0  # within the reservation: checked on admission
    total = 0
    try:
        sink = MultipartFile(request.headers["content-type"], size) if _is_multipart(request) else RawBody(size)
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > body_limit:
                    raise _too_large(limit)
                sink.write(chunk)
        data = sink.finish()
    except TimeoutError:
        raise HTTPException(408, f"the upload did not arrive within {timeout_s:g} s", headers={"Connection": "close"}) from None
    except UploadError as exc:
        raise HTTPException(400, str(exc)) from None
    if len(data) > limit:
        raise _too_large(limit)
    if not data:
        raise HTTPException(400, "empty upload (0 bytes)")
    if sniff(data) is None:
        raise HTTPException(
            415,
            "unsupported type: expected PNG, JPEG or DICOM (Part 10: 'DICM' after the 128-byte preamble); "
            "the type is judged by the file's content, not its name",
        )
    return data


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"upload larger than the limit of {limit:,} bytes")


def _decode(predictor: BasePredictor, data: bytearray, max_decoded_bytes: int) -> np.ndarray:
    """uint8 (S, S) pixels, or 422 with the decoder's reason (patient values scrubbed)."""
    try:
        return decode_upload(predictor, data, max_decoded_bytes)
    except ImageReadError as exc:
        reason = exc.reason
    raise HTTPException(422, f"cannot decode the image: {reason}")


def _predict_job(predictor: BasePredictor, data: bytearray, with_image: bool, max_decoded_bytes: int) -> dict[str, Any]:
    from cxrdx.explain.render import png_bytes

    pixels = _decode(predictor, data, max_decoded_bytes)
    prediction = predictor.predict_pixels(pixels, UPLOAD_NAME)  # pixels already decoded
    if not prediction.accepted:
        raise HTTPException(422, f"refused by the input guard: {prediction.reason}")
    result: dict[str, Any] = {
        "ood_score": prediction.ood_score,
        "probabilities": prediction.probabilities,
        "thresholds": prediction.thresholds,
        "positives": prediction.positives,
    }
    if with_image:
        result["image"] = "data:image/png;base64," + base64.b64encode(png_bytes(predictor.model_view(pixels))).decode()
    return result


def _explain_job(predictor: BasePredictor, data: bytearray, finding_index: int, method: str, max_decoded_bytes: int) -> bytes:
    from cxrdx.explain.render import heatmap_png
    from cxrdx.predict import Predictor

    if not isinstance(predictor, Predictor):  # the route answers 501 for other backends before queueing this job
        raise TypeError(f"heatmaps need a PyTorch model, not the {predictor.backend} backend")
    return heatmap_png(predictor, _decode(predictor, data, max_decoded_bytes), finding_index, method)


def _can_explain(predictor: BasePredictor) -> bool:
    return hasattr(predictor, "model")


def _methods() -> list[str]:
    from cxrdx.explain import METHODS

    return list(METHODS)
