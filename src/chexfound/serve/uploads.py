"""One upload -> the model's input tensor (and the page's view of it), with every limit checked first.

Runs in the thread pool, at most `decode_workers` at a time (the route holds a `limits.WorkGate` slot: each
upload holds a full-size float image). The checks go from cheapest to dearest: the byte count, then the
header's declared size against the per-side and total-pixel limits (so an 8000 x 8000 PNG is refused before a
pixel is decoded), then the decode, then the decoded size (headers can understate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import UploadFile

from chexfound.errors import CXRReadError
from chexfound.io import ImageReadError, ReadFailure, declared_size, read_image_bytes
from chexfound.serve import overlay
from chexfound.serve.limits import size_problem
from chexfound.serve.state import ServeSettings, ServeState

log = logging.getLogger(__name__)


class UploadRejected(Exception):
    """An upload the service refuses: the HTTP status, a message naming the upload, and (for unreadable
    images) the `ReadFailure` kind, sent to the client as {"detail": ..., "kind": ...}."""

    def __init__(self, status: int, detail: str, kind: ReadFailure | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.kind = status, detail, kind


@dataclass
class DecodedUpload:
    x: Any  # the model input tensor [3, S, S]
    view: np.ndarray | None  # uint8 display view (only when the page will fetch it)
    meta: dict[str, Any]  # what the reader found (format, size, photometric...) plus `bytes`


def decode_upload(upload: UploadFile, state: ServeState, keep_view: bool) -> DecodedUpload:
    name = upload.filename or "upload"
    label = f"upload {name!r}"  # how the reader names it in logs (never a server path)
    limits = state.settings
    upload.file.seek(0)
    data = upload.file.read(limits.max_upload_bytes + 1)
    if not data:
        raise UploadRejected(400, f"{name}: empty upload", ReadFailure.EMPTY)
    if len(data) > limits.max_upload_bytes:
        raise UploadRejected(413, f"{name}: upload too large: more than {limits.max_upload_bytes} bytes "
                                  f"(limit {limits.max_upload_bytes})")
    try:
        sides = declared_size(data, label)
    except ImageReadError as e:  # a decompression bomb, refused from its header
        raise UploadRejected(413, f"{name}: {e.reason}", e.kind) from e
    if sides:
        _check_size(name, sides, limits)
    try:
        img = read_image_bytes(data, label)
    except Exception as e:  # whatever a decoder raises on hostile input, the client gets a 4xx
        if not isinstance(e, (CXRReadError, ValueError, OSError)):
            log.warning("unexpected %s reading %s", type(e).__name__, label, exc_info=True)
        kind = getattr(e, "kind", None)
        reason = getattr(e, "reason", None) or str(e) or type(e).__name__
        status = 413 if kind is ReadFailure.TOO_LARGE else 400
        raise UploadRejected(status, f"{name}: not a readable chest X-ray: {reason}", kind) from e
    _check_size(name, img.shape, limits)
    try:
        x = state.predictor.preprocess(img)
    except ValueError as e:
        raise UploadRejected(400, f"{name}: not a readable chest X-ray: {e}") from e
    view = None
    if keep_view:
        shown = overlay.display_view(img.pixels, state.predictor.transform, state.display_size)
        view = np.clip(np.rint(shown * 255.0), 0, 255).astype(np.uint8)
    return DecodedUpload(x, view, dict(img.meta, bytes=len(data)))


def _check_size(name: str, sides: tuple[int, ...], limits: ServeSettings) -> None:
    problem = size_problem(sides, limits.max_image_side, limits.max_image_pixels)
    if problem:
        raise UploadRejected(413, f"{name}: {problem}", ReadFailure.TOO_LARGE)
