"""The web service: FastAPI over a predictor, with hardened uploads and a bounded inference queue.

Uploads are read into memory only (never spooled to disk, never logged), typed by their first
bytes (PNG, JPEG, DICOM Part 10), and decoded and predicted on one worker thread so the event loop
stays free; at most `queue_size` requests are admitted to that thread at once, the rest get 503
with Retry-After. Values of the DICOM patient module are scrubbed from every message.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from pydantic import BaseModel, Field

from cxrdx import __version__
from cxrdx.predict import BasePredictor

log = logging.getLogger("cxrdx.serve")
T = TypeVar("T")

MAX_UPLOAD_BYTES = 32 * 2**20
QUEUE_SIZE = 16
RETRY_AFTER_S = 2
MULTIPART_SLACK = 16 * 2**10  # boundary and part headers around the file
UPLOAD_NAME = "upload"  # the client's file name is never echoed: it may name the patient
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
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
ERRORS = {
    400: {"description": "empty or malformed upload"},
    413: {"description": "upload larger than the limit"},
    415: {"description": "not PNG, JPEG or DICOM (judged by content)"},
    422: {"description": "an image that cannot be decoded, or a bad parameter"},
    503: {"description": "inference queue full; see Retry-After"},
}


class PredictResponse(BaseModel):
    model: str = Field(description="the network, e.g. resnet50")
    backend: str = Field(description="pytorch or onnxruntime")
    cxrdx_version: str
    probabilities: dict[str, float] = Field(description="the 14 findings in canonical order")
    thresholds: dict[str, float] = Field(description="decision threshold of each finding")
    positives: list[str] = Field(description="findings whose probability reaches their threshold")
    image: str | None = Field(None, description="with ?image=true: the model's view of the image, PNG data URL")


def create_app(predictor: BasePredictor, max_upload_bytes: int = MAX_UPLOAD_BYTES, queue_size: int = QUEUE_SIZE) -> FastAPI:
    """The service around one predictor (PyTorch `Predictor` or `OnnxPredictor`)."""
    queue = InferenceQueue(queue_size)
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
    app.state.predictor, app.state.queue = predictor, queue
    page = resources.files("cxrdx.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    info = predictor.info

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
        return _jsonable(
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
                "trained_with_cxrdx": info.cxrdx_version,
                "cxrdx_version": __version__,
                "explain": {"available": _can_explain(predictor), "methods": _methods() if _can_explain(predictor) else []},
                "max_upload_bytes": max_upload_bytes,
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
        data = await read_upload(request, max_upload_bytes)
        result = await queue.run(_predict_job, predictor, data, image)
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
        data = await read_upload(request, max_upload_bytes)
        png = await queue.run(_explain_job, predictor, data, info.findings.index(finding), method)
        return Response(png, media_type="image/png")

    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` (several workers): each worker loads the model named by
    CXRDX_SERVE_CHECKPOINT or CXRDX_SERVE_ONNX itself (CXRDX_SERVE_TRUST_PICKLE=1: an old pickle checkpoint too)."""
    from cxrdx.export import OnnxPredictor
    from cxrdx.predict import Predictor

    env = os.environ
    if env.get("CXRDX_SERVE_ONNX"):
        predictor: BasePredictor = OnnxPredictor.from_file(env["CXRDX_SERVE_ONNX"])
    else:
        predictor = Predictor.from_checkpoint(env["CXRDX_SERVE_CHECKPOINT"], device=env.get("CXRDX_SERVE_DEVICE", "auto"),
                                              trust_pickle=env.get("CXRDX_SERVE_TRUST_PICKLE") == "1")
    return create_app(
        predictor,
        max_upload_bytes=int(env.get("CXRDX_SERVE_MAX_UPLOAD", MAX_UPLOAD_BYTES)),
        queue_size=int(env.get("CXRDX_SERVE_QUEUE", QUEUE_SIZE)),
    )


class InferenceQueue:
    """One worker thread; at most `capacity` jobs admitted (running or waiting), else 503."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"queue_size must be at least 1, got {capacity}")
        self.capacity = capacity
        self.admitted = 0
        # One thread: the model is not re-entrant while a CAM method has hooks on it.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrdx-inference")

    def state(self) -> dict[str, int]:
        return {"admitted": self.admitted, "capacity": self.capacity}

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.admitted >= self.capacity:
            raise HTTPException(
                503,
                f"busy: {self.admitted} requests are already queued for inference; retry in a moment",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        loop = asyncio.get_running_loop()
        self.admitted += 1
        job = self.executor.submit(fn, *args)
        # Released when the job ends, not when the client leaves: the thread is busy until then.
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(job)

    def _release(self) -> None:
        self.admitted -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


async def read_upload(request: Request, limit: int) -> bytes:
    """The uploaded file's bytes: the `file` part of multipart/form-data, or the raw body."""
    content_type = request.headers.get("content-type", "")
    multipart = content_type.lower().startswith("multipart/form-data")
    body_limit = limit + MULTIPART_SLACK if multipart else limit
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > body_limit:
        raise _too_large(limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > body_limit:
            raise _too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    data = _multipart_file(body, content_type) if multipart else body
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


def sniff(data: bytes) -> str | None:
    """"png", "jpeg" or "dicom" from the first bytes; None for anything else."""
    from cxrdx.data.imageio import is_dicom

    for kind, magic in MAGIC.items():
        if data.startswith(magic):
            return kind
    return "dicom" if is_dicom(data) else None


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"upload larger than the limit of {limit:,} bytes")


def _multipart_file(body: bytes, content_type: str) -> bytes:
    """The `file` part (or the first part with a file name) of a multipart body, parsed in memory."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise HTTPException(400, "multipart upload without a boundary")
    parts: list[dict[str, Any]] = []
    header: dict[str, bytes] = {}

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": bytearray()})
        header.update(field=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][header["field"].lower()] = header["value"]
        header.update(field=b"", value=b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"] += data[start:end]

    callbacks = dict(
        on_part_begin=on_part_begin,
        on_header_field=on_header_field,
        on_header_value=on_header_value,
        on_header_end=on_header_end,
        on_part_data=on_part_data,
    )
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError:
        raise HTTPException(400, "malformed multipart/form-data body") from None
    for part in parts:
        disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))[1]
        if disposition.get(b"name") == b"file" or b"filename" in disposition:
            return bytes(part["data"])
    raise HTTPException(400, "multipart upload without a 'file' part")


def _decode(predictor: BasePredictor, data: bytes) -> np.ndarray:
    """uint8 (S, S) pixels, or 422 with the decoder's reason (patient values scrubbed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # decoder warnings may quote header values: none reach stderr
            return predictor.load(data, name=UPLOAD_NAME)
    except Exception as exc:  # hostile input may break any decoder layer: always a 422, never a dead worker
        reason = getattr(exc, "reason", None) or f"{exc.__class__.__name__}: {exc}"
        raise HTTPException(422, f"cannot decode the image: {scrub(reason, data)}") from None


def _predict_job(predictor: BasePredictor, data: bytes, with_image: bool) -> dict[str, Any]:
    pixels = _decode(predictor, data)
    prediction = predictor.prediction(UPLOAD_NAME, predictor.predict_proba(pixels[None])[0])  # pixels already decoded
    result: dict[str, Any] = {
        "probabilities": prediction.probabilities,
        "thresholds": prediction.thresholds,
        "positives": prediction.positives,
    }
    if with_image:
        view = _model_view(predictor, pixels)
        result["image"] = "data:image/png;base64," + base64.b64encode(_png(np.rint(view * 255).astype(np.uint8))).decode()
    return result


def _explain_job(predictor: BasePredictor, data: bytes, finding_index: int, method: str) -> bytes:
    import matplotlib
    import torch

    from cxrdx.explain import explain

    pixels = _decode(predictor, data)
    tensor = predictor.to_tensor(pixels[None]).to(predictor.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a flat map is returned as zeros: a plain image, not an error
        with torch.enable_grad():
            heat = explain(predictor.model, tensor, finding_index, method=method)
    gray = _model_view(predictor, pixels)
    colour = matplotlib.colormaps["jet"](heat)[..., :3]
    overlay = 0.55 * gray[..., None] + 0.45 * colour
    return _png(np.rint(np.clip(overlay, 0, 1) * 255).astype(np.uint8))


def _model_view(predictor: BasePredictor, pixels: np.ndarray) -> np.ndarray:
    """The network's input, un-normalized to [0, 1] (H, W): what the model and the heatmap see."""
    x = predictor.to_tensor(pixels[None])[0, 0].numpy().astype(np.float64)
    return np.clip(x * predictor.info.std[0] + predictor.info.mean[0], 0.0, 1.0)


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _can_explain(predictor: BasePredictor) -> bool:
    return hasattr(predictor, "model")


def _methods() -> list[str]:
    from cxrdx.explain import METHODS

    return list(METHODS)


def scrub(message: str, data: bytes) -> str:
    """Replace every value of the DICOM patient module (group 0010) found in `message` with [removed]."""
    from cxrdx.data.imageio import is_dicom

    if not is_dicom(data):
        return message
    try:
        import pydicom

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        values = [str(e.value) for e in ds.iterall() if e.tag.group == 0x0010 and e.VR not in ("SQ", "OB", "UN")]
        values += [part for v in values for part in v.split("^")]  # person names: each component too
    except Exception:  # the header itself is unreadable: then no value of it can be quoted either
        return message
    for value in sorted({v for v in values if len(v) >= 2}, key=len, reverse=True):
        message = message.replace(value, "[removed]")
    return message


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays to Python; NaN and infinity to None (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
