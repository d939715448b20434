"""What the HTTP service holds while it runs: its settings and one `ServeState` (the predictor, the
micro-batcher, the prediction cache, the work gate), built once by `create_app` and read by the routes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from chexfound import __version__
from chexfound.serve import overlay
from chexfound.serve.batching import MicroBatcher
from chexfound.serve.limits import DEFAULT_MAX_IMAGE_PIXELS, WorkGate, available_cores
from chexfound.serve.prediction_cache import PredictionCache
from chexfound.serve.predictor import Predictor


@dataclass
class ServeSettings:
    max_upload_bytes: int = 64 * 1024 * 1024
    max_image_side: int = 8192  # rows or columns; larger uploads get 413 before their pixels are decoded
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # rows x columns, checked from the header too (`limits`)
    max_batch: int = 16
    max_wait_ms: float = 5.0
    queue_size: int = 64  # requests admitted at once (decoding + waiting + in the model); more get 503
    # uploads decoded or waiting for the model at once (each holds a full-size image): the cores by default
    decode_workers: int = field(default_factory=available_cores)
    busy_wait_s: float = 10.0  # how long an upload waits for one of those slots before 503 + Retry-After
    cache_size: int = 32  # recent predictions kept for the page's image/heatmap URLs
    request_timeout_s: float = 120.0
    default_top_k: int = 3


@dataclass
class ServeState:
    predictor: Predictor
    settings: ServeSettings
    batcher: MicroBatcher
    cache: PredictionCache
    work_gate: WorkGate  # at most `decode_workers` uploads decoded or run at once
    display_size: int  # side of the page's image and heatmap PNGs
    model_summary: dict[str, Any]  # sent with every prediction
    no_heatmap_reason: str | None  # None when the model gives heatmaps (of predictor.heatmap_kind)

    @classmethod
    def build(cls, predictor: Predictor, settings: ServeSettings) -> ServeState:
        has_heatmaps = predictor.has_heatmaps
        return cls(
            predictor=predictor,
            settings=settings,
            batcher=MicroBatcher(predictor.predict_tensor, settings.max_batch, settings.max_wait_ms,
                                 settings.queue_size),
            cache=PredictionCache(settings.cache_size),
            work_gate=WorkGate(settings.decode_workers, settings.busy_wait_s),
            display_size=overlay.display_size_for(predictor.transform),
            model_summary={"backbone_sha256": predictor.backbone_sha256, "head_type": predictor.head_type,
                           "task": predictor.task, "version": __version__},
            no_heatmap_reason=None if has_heatmaps else f"the head ({predictor.head_type}) has no heatmaps",
        )


def serve_state(request: Request) -> ServeState:
    """The FastAPI dependency the routes use to reach the running service."""
    return request.app.state.serve
