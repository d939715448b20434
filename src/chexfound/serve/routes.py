"""The HTTP routes, as plain functions on one APIRouter; each reaches the service through `ServeState`.

    POST /v1/predict                      multipart `file` (DICOM/PNG/JPEG) -> findings JSON (+ heatmaps)
    GET  /v1/predictions/{id}/image.png   the model's view of an uploaded image (for the page; DICOM too)
    GET  /v1/predictions/{id}/heatmap.png?finding=NAME   one finding's overlay
    GET  /v1/model                        backbone/head identity, findings, thresholds, transform, limits
    GET  /healthz                         liveness + queue state
    GET  /                                the web page
    GET  /docs, /openapi.json             the API reference (HTML, rendered here) and its OpenAPI document
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from chexfound.serve import overlay
from chexfound.serve.api_page import render_api_page
from chexfound.serve.batching import QueueFull
from chexfound.serve.prediction import finding_records
from chexfound.serve.prediction_cache import CachedPrediction
from chexfound.serve.schemas import ErrorOut, PredictionOut
from chexfound.serve.state import ServeState, serve_state
from chexfound.serve.uploads import DecodedUpload, decode_upload

STATIC = Path(__file__).parent / "static"
PREDICT_PATH = "/v1/predict"
PNG_CACHE_HEADERS = {"Cache-Control": "private, max-age=3600"}

State = Annotated[ServeState, Depends(serve_state)]
router = APIRouter()


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: uptime checks, curl -I
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/docs", include_in_schema=False)
def api_reference(request: Request) -> HTMLResponse:
    return HTMLResponse(render_api_page(request.app.openapi()))


@router.api_route("/healthz", methods=["GET", "HEAD"], summary="Liveness and queue state")
def healthz(state: State) -> dict[str, Any]:
    b = state.batcher
    return {"status": "ok", "in_flight": b.in_flight, "capacity": b.capacity, "batcher": b.stats.to_dict(),
            "cached_predictions": len(state.cache)}


@router.get("/v1/model", summary="Backbone and head identity, findings, thresholds, input transform, limits")
def model_info(state: State) -> dict[str, Any]:
    info = state.predictor.info()
    info["limits"] = asdict(state.settings)
    return info


@router.post(PREDICT_PATH, response_model=PredictionOut, response_model_exclude_none=True,
             summary="Findings for one chest X-ray",
             responses={400: {"model": ErrorOut, "description": "unreadable or empty upload (`kind` says why)"},
                        411: {"description": "no Content-Length"},
                        413: {"model": ErrorOut, "description": "upload or image too large"},
                        503: {"description": "queue full; retry later"},
                        504: {"description": "timed out waiting for the model"}})
async def predict(
    state: State,
    file: UploadFile = File(..., description="a DICOM, PNG or JPEG chest X-ray"),
    heatmaps: Literal["none", "url", "base64"] = Query(
        "none", description="url: cache the image and give per-finding heatmap URLs (and image_url); "
                            "base64: inline PNG overlays for the top_k findings"),
    top_k: int | None = Query(None, ge=0, description="heatmaps=base64: how many (0 = all; default: the "
                                                       "server's default_top_k, see /v1/model limits)"),
) -> Any:
    t0 = time.perf_counter()
    try:
        slot = state.batcher.reserve()
    except QueueFull as e:
        return JSONResponse({"detail": f"server busy: {e}; retry later"}, 503, headers={"Retry-After": "1"})
    try:
        decoded = await run_in_threadpool(decode_upload, file, state, heatmaps != "none")
        t1 = time.perf_counter()
        fut = slot.submit(decoded.x)
        try:
            probs, maps = await asyncio.wait_for(asyncio.wrap_future(fut), state.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, "timed out waiting for the model") from None
        t2 = time.perf_counter()
    finally:
        slot.release()
    k = state.settings.default_top_k if top_k is None else top_k
    return await run_in_threadpool(prediction_body, state, file.filename, decoded, probs, maps, heatmaps, k,
                                   {"decode": (t1 - t0) * 1e3, "model": (t2 - t1) * 1e3})


def prediction_body(state: ServeState, filename: str | None, decoded: DecodedUpload, probs: np.ndarray,
                    maps: np.ndarray | None, heatmaps: str, top_k: int, timing: dict[str, float]) -> dict[str, Any]:
    """The /v1/predict JSON (a PredictionOut): findings in the head's order, calls, image facts, heatmaps."""
    predictor = state.predictor
    findings = finding_records(predictor.findings, probs, predictor.thresholds, predictor.task,
                               predictor.threshold_rules, predictor.reliability)
    pid = None
    image_url = None
    if heatmaps == "url" and decoded.view is not None:
        pid = state.cache.put(decoded.view, maps)
        image_url = f"/v1/predictions/{pid}/image.png"
        if maps is not None:
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
        "model": state.model_summary,
        "image": {
            "filename": filename, "bytes": int(m.get("bytes", 0)),
            "source_format": None if m.get("source_format") is None else str(m["source_format"]),
            "original_size": None if size is None else [int(s) for s in size],
            "photometric_interpretation": m.get("photometric_interpretation"),
            "view_position": m.get("view_position"),
            "image_url": image_url,
            "warnings": list(m.get("warnings") or []) or None,
        },
        "uninformative": (predictor.reliability.head_reason or "uninformative head")
        if predictor.reliability.head_informative is False else None,
        "heatmaps": {"available": state.no_heatmap_reason is None, "reason": state.no_heatmap_reason},
        "timing_ms": {k: round(v, 2) for k, v in timing.items()},
    }


def _cached(state: ServeState, pid: str) -> CachedPrediction:
    item = state.cache.get(pid)
    if item is None:
        raise HTTPException(404, f"prediction {pid} not found (only the last {state.settings.cache_size} are kept)")
    return item


@router.get("/v1/predictions/{pid}/image.png", summary="The model's view of an uploaded image",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
def image_png(state: State, pid: str) -> Response:
    return Response(overlay.png_bytes(_cached(state, pid).view), media_type="image/png", headers=PNG_CACHE_HEADERS)


@router.get("/v1/predictions/{pid}/heatmap.png", summary="One finding's heatmap overlay",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
def heatmap_png(state: State, pid: str,
                finding: str = Query(..., description="finding name as in /v1/model")) -> Response:
    item = _cached(state, pid)
    if item.maps is None:
        raise HTTPException(409, state.no_heatmap_reason or "no attention maps for this prediction")
    findings = state.predictor.findings
    if finding not in findings:
        raise HTTPException(404, f"unknown finding {finding!r}; known: {findings}")
    png = overlay.overlay_png(item.view.astype(np.float32) / 255.0, item.maps[findings.index(finding)])
    return Response(png, media_type="image/png", headers=PNG_CACHE_HEADERS)
