"""The HTTP service: FastAPI app around one `Predictor` (`create_app`), with the web page at / and the
API reference at /docs (routes in `routes`, what they share in `state.ServeState`).

Uploads are bounded (bytes, image sides and pixels: `limits`), at most one per core is decoded or run at
once, the model runs in micro-batches shared by concurrent requests, and a full queue or a long wait for a
decode slot answers 503 instead of growing memory.
Every response carries the security headers of `middleware.SECURITY_HEADERS`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from chexfound import __version__
from chexfound.serve.middleware import SecurityHeaders, UploadLimit
from chexfound.serve.predictor import Predictor
from chexfound.serve.routes import PREDICT_PATH, STATIC, router
from chexfound.serve.state import ServeSettings, ServeState
from chexfound.serve.uploads import UploadRejected

__all__ = ["ServeSettings", "ServeState", "create_app"]


def create_app(predictor: Predictor, settings: ServeSettings | None = None) -> FastAPI:
    state = ServeState.build(predictor, settings or ServeSettings())
    predictor.warmup()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        try:
            yield
        finally:
            state.batcher.stop()

    app = FastAPI(
        title="chexfound",
        version=__version__,
        description="Chest X-ray findings (CheXFound backbone + head): probabilities, calls and heatmaps.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; /docs is our own page (routes.api_reference)
        redoc_url=None,
    )
    app.state.serve = state
    # the parts tests and tools reach for directly
    app.state.predictor, app.state.batcher, app.state.cache, app.state.settings = (
        predictor, state.batcher, state.cache, state.settings)
    app.add_middleware(UploadLimit, max_bytes=state.settings.max_upload_bytes, path=PREDICT_PATH)
    app.add_middleware(SecurityHeaders)  # added last = outermost: also on UploadLimit's 411/413
    app.add_exception_handler(UploadRejected, _upload_rejected)  # type: ignore[arg-type]
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(router)
    state.batcher.start()  # also when the app is used without its lifespan (e.g. a plain TestClient)
    return app


async def _upload_rejected(_: Request, e: UploadRejected) -> JSONResponse:
    body = {"detail": e.detail} if e.kind is None else {"detail": e.detail, "kind": e.kind.value}
    return JSONResponse(body, e.status)
