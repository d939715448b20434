"""The HTTP routes, as plain functions on one APIRouter; each reaches the service through `ServeState`.

    POST /v1/predict                      multipart `file` (DICOM/PNG/JPEG) -> findings JSON (+ heatmaps)
    GET  /v1/predictions/{id}/image.png   the model's view of an uploaded image (for the page; DICOM too)
    GET  /v1/predictions/{id}/heatmap.png?finding=NAME   one finding's overlay
    POST /v1/predict/sr                   multipart `file` (DICOM) -> its findings as a DICOM Comprehensive SR
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

from chexfound.adapt.attribution import KIND_DESCRIPTIONS
from chexfound.serve import overlay
from chexfound.serve.api_page import render_api_page
from chexfound.serve.batching import QueueFull
from chexfound.serve.limits import GateBusy
from chexfound.serve.prediction import finding_records
from chexfound.serve.prediction_cache import CachedPrediction
from chexfound.serve.schemas import ErrorOut, PredictionOut
from chexfound.serve.state import ServeState, serve_state
from chexfound.serve.uploads import DecodedUpload, UploadRejected, decode_upload

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


@router.get("/favicon.ico", include_in_schema=False)  # browsers ask for it whatever the page links
def favicon() -> FileResponse:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


@router.get("/healthz", summary="Liveness and queue state")
def healthz(state: State) -> dict[str, Any]:
    b = state.batcher
    return {"status": "ok", "in_flight": b.in_flight, "capacity": b.capacity, "batcher": b.stats.to_dict(),
            "decoding": state.work_gate.to_dict(), "cached_predictions": len(state.cache)}


# HEAD for uptime checks (curl -I), kept out of the schema: one route for GET and HEAD would give both methods
# the same OpenAPI operation id.
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)


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
                        503: {"description": "queue full or every decode slot busy; retry after Retry-After seconds"},
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
        # Decoding and the model wait hold a full-size image: only `decode_workers` uploads at once (limits).
        try:
            await state.work_gate.enter()
        except GateBusy as e:
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
            state.work_gate.leave()
    finally:
        slot.release()
    k = state.settings.default_top_k if top_k is None else top_k
    return await run_in_threadpool(prediction_body, state, file.filename, decoded, probs, maps, heatmaps, k,
                                   {"decode": (t1 - t0) * 1e3, "model": (t2 - t1) * 1e3})


@router.post(PREDICT_PATH + "/sr", summary="Findings for one DICOM chest X-ray as a DICOM Comprehensive SR",
             response_class=Response,
             responses={200: {"content": {"application/dicom": {}},
                              "description": "a TID 1500 Measurement Report in a new series of the image's study"},
                        400: {"model": ErrorOut, "description": "unreadable or empty upload"},
                        415: {"model": ErrorOut, "description": "not DICOM (PNG/JPEG: no study to attach to)"},
                        422: {"model": ErrorOut, "description": "a DICOM without the UIDs an SR needs"},
                        503: {"description": "queue full; retry later"}})
async def predict_sr(state: State, file: UploadFile = File(..., description="a DICOM chest X-ray")) -> Any:
    # The header first: a PNG or a DICOM without UIDs is refused before the model runs.
    source = await run_in_threadpool(_sr_source, file, state.settings.max_upload_bytes)
    try:
        slot = state.batcher.reserve()
    except QueueFull as e:
        return JSONResponse({"detail": f"server busy: {e}; retry later"}, 503, headers={"Retry-After": "1"})
    try:
        decoded = await run_in_threadpool(decode_upload, file, state, False)
        try:
            probs, _ = await asyncio.wait_for(asyncio.wrap_future(slot.submit(decoded.x)),
                                              state.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, "timed out waiting for the model") from None
    finally:
        slot.release()
    body = await run_in_threadpool(_sr_bytes, state, source, file.filename, probs)
    stem = Path(file.filename or "upload").stem
    return Response(body, media_type="application/dicom",
                    headers={"Content-Disposition": f'attachment; filename="{quote(stem)}.sr.dcm"'})


def _sr_source(file: UploadFile, limit: int) -> Any:
    from chexfound.serve.dicom_source import MissingUIDs, NotDicom, read_header, source_reference

    name = file.filename or "upload"
    file.file.seek(0)
    data = file.file.read(limit + 1)
    if not data:
        raise UploadRejected(400, f"{name}: empty upload")
    if len(data) > limit:
        raise UploadRejected(413, f"{name}: upload too large: more than {limit} bytes")
    try:
        return source_reference(read_header(data, name), name)
    except NotDicom as e:
        raise UploadRejected(415, f"{e} (an SR needs a DICOM study to attach to)") from e
    except MissingUIDs as e:
        raise UploadRejected(422, str(e)) from e


def _sr_bytes(state: ServeState, source: Any, filename: str | None, probs: np.ndarray) -> bytes:
    from chexfound.serve.algorithm_id import AlgorithmIdentity
    from chexfound.serve.dicom_out import dataset_bytes
    from chexfound.serve.dicom_sr import build_sr
    from chexfound.serve.prediction import Prediction

    p = state.predictor
    pred = Prediction(path=filename, findings=p.findings, thresholds=p.thresholds, task=p.task,
                      probabilities=probs, threshold_rules=p.threshold_rules, reliability=p.reliability)
    return dataset_bytes(build_sr(source, pred.findings_list(), AlgorithmIdentity.of(p)))


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
        "heatmaps": {"available": state.no_heatmap_reason is None, "reason": state.no_heatmap_reason,
                     "kind": predictor.heatmap_kind, "description": KIND_DESCRIPTIONS[predictor.heatmap_kind]},
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
