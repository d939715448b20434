"""The HTTP service: FastAPI app around one `Predictor`.

    POST /v1/predict                      multipart `file` (DICOM/PNG/JPEG) -> findings JSON (+ heatmaps)
    GET  /v1/predictions/{id}/image.png   the model's view of an uploaded image (for the page; DICOM too)
    GET  /v1/predictions/{id}/heatmap.png?finding=NAME   one finding's overlay
    GET  /v1/model                        backbone/head identity, findings, thresholds, transform, limits
    GET  /healthz                         liveness + queue state
    GET  /                                the web page;  /openapi.json, /docs  the API spec

Uploads are bounded (bytes and image sides), decoding runs in a bounded worker pool, the model runs in
micro-batches shared by concurrent requests, and a full queue answers 503 instead of growing memory.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from chexfound import __version__
from chexfound.errors import CXRReadError
from chexfound.io import read_image
from chexfound.serve import overlay
from chexfound.serve.batching import MicroBatcher, QueueFull
from chexfound.serve.prediction import CALL_TASKS
from chexfound.serve.predictor import Predictor

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PREDICT_PATH = "/v1/predict"
# Multipart framing around the file (boundaries, headers) on top of the file's own bytes.
MULTIPART_SLACK = 64 * 1024


@dataclass
class ServeSettings:
    max_upload_bytes: int = 64 * 1024 * 1024
    max_image_side: int = 8192  # rows or columns; larger uploads get 413 before their pixels are decoded
    max_batch: int = 16
    max_wait_ms: float = 5.0
    queue_size: int = 64  # requests admitted at once (decoding + waiting + in the model); more get 503
    decode_workers: int = 4  # concurrent decodes: each holds a full-size float image in memory
    cache_size: int = 32  # recent predictions kept for the page's image/heatmap URLs
    request_timeout_s: float = 120.0
    default_top_k: int = 3


# -- response models (they make the OpenAPI spec say what clients get) --
class FindingOut(BaseModel):
    name: str
    probability: float
    threshold: float
    positive: bool | None = Field(None, description="probability >= threshold (absent for regression/survival)")
    heatmap_url: str | None = None
    heatmap_png: str | None = Field(None, description="base64 PNG overlay (heatmaps=base64, top-k findings)")


class HeatmapInfo(BaseModel):
    available: bool
    reason: str | None = None


class ImageOut(BaseModel):
    filename: str | None
    bytes: int
    source_format: str | None = None
    original_size: list[int] | None = None
    photometric_interpretation: str | None = None
    view_position: str | None = None
    image_url: str | None = None


class PredictionOut(BaseModel):
    id: str | None = Field(None, description="key of the cached image/heatmaps (heatmaps=url)")
    findings: list[FindingOut] = Field(description="one entry per finding, in the head's order")
    positive: list[str]
    model: dict[str, Any]
    image: ImageOut
    heatmaps: HeatmapInfo
    timing_ms: dict[str, float]


class _Cached:
    __slots__ = ("view", "maps")

    def __init__(self, view: np.ndarray, maps: np.ndarray | None) -> None:
        self.view, self.maps = view, maps


class PredictionCache:
    """A small LRU of (display view uint8, attention maps) so the page can fetch images lazily."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, _Cached] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, view: np.ndarray, maps: np.ndarray | None) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._items[key] = _Cached(view, maps)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> _Cached | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def __len__(self) -> int:
        return len(self._items)


class UploadLimit:
    """Reject oversized uploads from the Content-Length header, before the body is read or spooled."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == PREDICT_PATH:
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            if length is None:
                await JSONResponse({"detail": "uploads need a Content-Length header"}, 411)(scope, receive, send)
                return
            if not length.isdigit() or int(length) > self.max_bytes + MULTIPART_SLACK:
                await JSONResponse({"detail": f"upload too large: {length.decode(errors='replace')} bytes "
                                              f"(limit {self.max_bytes})"}, 413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _TooManyPixels(Exception):
    pass


def _image_sides(path: Path) -> tuple[int, int] | None:
    """(rows, cols) from the header alone (PIL opens lazily; DICOM stops before the pixel data); None when
    the header does not say. Raises _TooManyPixels for PIL's decompression-bomb guard."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Image.DecompressionBombError as e:
        raise _TooManyPixels(str(e)) from e
    except Exception:  # not a PIL image; try DICOM
        pass
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        rows, cols = ds.get("Rows"), ds.get("Columns")
        return (int(rows), int(cols)) if rows and cols else None
    except Exception:
        return None


class _Decoded:
    def __init__(self, x: Any, view: np.ndarray | None, meta: dict[str, Any]) -> None:
        self.x, self.view, self.meta = x, view, meta


def create_app(predictor: Predictor, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    batcher = MicroBatcher(predictor.predict_tensor, settings.max_batch, settings.max_wait_ms, settings.queue_size)
    cache = PredictionCache(settings.cache_size)
    decode_gate = threading.BoundedSemaphore(settings.decode_workers)
    predictor.warmup()
    has_attention = predictor.has_attention
    display = overlay.display_size_for(predictor.transform)
    no_heatmap_reason = None if has_attention else (
        f"the head ({predictor.head_type}) returns no attention maps; heatmaps need an attention head such as GLoRI")
    model_summary = {
        "backbone_sha256": predictor.backbone_sha256,
        "head_type": predictor.head_type,
        "task": predictor.task,
        "version": __version__,
    }

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(
        title="chexfound",
        version=__version__,
        description="Chest X-ray findings (CheXFound backbone + head): probabilities, calls and heatmaps.",
        lifespan=lifespan,
    )
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.predictor, app.state.batcher, app.state.cache, app.state.settings = predictor, batcher, cache, settings
    batcher.start()  # also when the app is used without its lifespan (e.g. a plain TestClient)

    def decode(upload: UploadFile, keep_view: bool) -> _Decoded:
        """Runs in the thread pool: spool the upload to a file, check it, read it, transform it."""
        name = upload.filename or "upload"
        with decode_gate, tempfile.TemporaryDirectory(prefix="chexfound-upload-") as tmp:
            # Keep the extension (a hint for the reader), never anything else of a client-chosen name.
            path = Path(tmp) / ("upload" + re.sub(r"[^A-Za-z0-9.]", "", Path(name).suffix)[:16])
            with open(path, "wb") as f:
                upload.file.seek(0)
                shutil.copyfileobj(upload.file, f, 1 << 20)
                n = f.tell()
            if n == 0:
                raise HTTPException(400, f"{name}: empty upload")
            if n > settings.max_upload_bytes:
                raise HTTPException(413, f"{name}: upload too large: {n} bytes (limit {settings.max_upload_bytes})")
            try:
                sides = _image_sides(path)
            except _TooManyPixels as e:
                raise HTTPException(413, f"{name}: {e}") from e
            if sides and max(sides) > settings.max_image_side:
                raise HTTPException(413, f"{name}: image is {sides[0]}x{sides[1]} pixels; the limit is "
                                         f"{settings.max_image_side} per side")
            try:
                img = read_image(path)
            except Exception as e:  # whatever a decoder raises on hostile input, the client gets a 4xx
                if not isinstance(e, (CXRReadError, ValueError, OSError)):
                    log.warning("unexpected %s reading upload %r", type(e).__name__, name, exc_info=True)
                reason = getattr(e, "reason", None) or str(e) or type(e).__name__
                raise HTTPException(400, f"{name}: not a readable chest X-ray: {reason.replace(str(path), name)}") from e
            if max(img.shape) > settings.max_image_side:  # headers can understate (e.g. odd DICOMs)
                raise HTTPException(413, f"{name}: image is {img.shape[0]}x{img.shape[1]} pixels; the limit is "
                                         f"{settings.max_image_side} per side")
            try:
                x = predictor.preprocess(img)
            except ValueError as e:
                raise HTTPException(400, f"{name}: not a readable chest X-ray: {e}") from e
            view = _to_u8(overlay.display_view(img.pixels, predictor.transform, display)) if keep_view else None
            meta = dict(img.meta, bytes=n)
        return _Decoded(x, view, meta)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", summary="Liveness and queue state")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "in_flight": batcher.in_flight, "capacity": batcher.capacity,
                "batcher": batcher.stats.to_dict(), "cached_predictions": len(cache)}

    @app.get("/v1/model", summary="Backbone and head identity, findings, thresholds, input transform, limits")
    def model_info() -> dict[str, Any]:
        info = predictor.info()
        info["limits"] = asdict(settings)
        return info

    @app.post(PREDICT_PATH, response_model=PredictionOut, response_model_exclude_none=True,
              summary="Findings for one chest X-ray",
              responses={400: {"description": "unreadable or empty upload"},
                         411: {"description": "no Content-Length"},
                         413: {"description": "upload or image too large"},
                         503: {"description": "queue full; retry later"},
                         504: {"description": "timed out waiting for the model"}})
    async def predict(
        file: UploadFile = File(..., description="a DICOM, PNG or JPEG chest X-ray"),
        heatmaps: Literal["none", "url", "base64"] = Query(
            "none", description="url: cache the image and give per-finding heatmap URLs (and image_url); "
                                "base64: inline PNG overlays for the top_k findings"),
        top_k: int = Query(settings.default_top_k, ge=0, description="heatmaps=base64: how many (0 = all)"),
    ) -> Any:
        t0 = time.perf_counter()
        try:
            slot = batcher.reserve()
        except QueueFull as e:
            return JSONResponse({"detail": f"server busy: {e}; retry later"}, 503, headers={"Retry-After": "1"})
        try:
            decoded = await run_in_threadpool(decode, file, heatmaps != "none")
            t1 = time.perf_counter()
            fut = slot.submit(decoded.x)
            try:
                probs, maps = await asyncio.wait_for(asyncio.wrap_future(fut), settings.request_timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(504, "timed out waiting for the model") from None
            t2 = time.perf_counter()
        finally:
            slot.release()
        return await run_in_threadpool(respond, file.filename, decoded, probs, maps, heatmaps, top_k,
                                       {"decode": (t1 - t0) * 1e3, "model": (t2 - t1) * 1e3})

    def respond(filename: str | None, decoded: _Decoded, probs: np.ndarray, maps: np.ndarray | None,
                heatmaps: str, top_k: int, timing: dict[str, float]) -> dict[str, Any]:
        calls = probs >= predictor.thresholds if predictor.task in CALL_TASKS else None
        findings = [
            {"name": n, "probability": float(probs[i]), "threshold": float(predictor.thresholds[i]),
             "positive": None if calls is None else bool(calls[i])}
            for i, n in enumerate(predictor.findings)
        ]
        pid = None
        image_url = None
        if heatmaps == "url" and decoded.view is not None:
            pid = cache.put(decoded.view, maps)
            image_url = f"/v1/predictions/{pid}/image.png"
            if maps is not None:
                from urllib.parse import quote

                for f in findings:
                    f["heatmap_url"] = f"/v1/predictions/{pid}/heatmap.png?finding={quote(f['name'], safe='')}"
        elif heatmaps == "base64" and maps is not None and decoded.view is not None:
            order = np.argsort(-probs, kind="stable")
            gray = decoded.view.astype(np.float32) / 255.0
            for i in order[: top_k or len(order)]:
                findings[int(i)]["heatmap_png"] = base64.b64encode(overlay.overlay_png(gray, maps[int(i)])).decode()
        m = decoded.meta
        size = m.get("original_size")
        return {
            "id": pid,
            "findings": findings,
            "positive": [f["name"] for f in findings if f["positive"]],
            "model": model_summary,
            "image": {
                "filename": filename, "bytes": int(m.get("bytes", 0)),
                "source_format": None if m.get("source_format") is None else str(m["source_format"]),
                "original_size": None if size is None else [int(s) for s in size],
                "photometric_interpretation": m.get("photometric_interpretation"),
                "view_position": m.get("view_position"),
                "image_url": image_url,
            },
            "heatmaps": {"available": has_attention, "reason": no_heatmap_reason},
            "timing_ms": {k: round(v, 2) for k, v in timing.items()},
        }

    def cached(pid: str) -> _Cached:
        item = cache.get(pid)
        if item is None:
            raise HTTPException(404, f"prediction {pid} not found (only the last {settings.cache_size} are kept)")
        return item

    @app.get("/v1/predictions/{pid}/image.png", summary="The model's view of an uploaded image",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def image_png(pid: str) -> Response:
        return Response(overlay.png_bytes(cached(pid).view), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/predictions/{pid}/heatmap.png", summary="One finding's heatmap overlay",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def heatmap_png(pid: str, finding: str = Query(..., description="finding name as in /v1/model")) -> Response:
        item = cached(pid)
        if item.maps is None:
            raise HTTPException(409, no_heatmap_reason or "no attention maps for this prediction")
        if finding not in predictor.findings:
            raise HTTPException(404, f"unknown finding {finding!r}; known: {predictor.findings}")
        i = predictor.findings.index(finding)
        png = overlay.overlay_png(item.view.astype(np.float32) / 255.0, item.maps[i])
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    return app


def _to_u8(view: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(view * 255.0), 0, 255).astype(np.uint8)
