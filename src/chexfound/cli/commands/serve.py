"""`chexfound serve`: the HTTP service and web page for one backbone + head."""

from __future__ import annotations

import argparse
import ipaddress
import logging

from chexfound.cli.commands.predict import add_model_args, load_predictor
from chexfound.errors import ConfigError

log = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 25_000_000  # chexfound.serve.limits.DEFAULT_MAX_IMAGE_PIXELS (not imported: keeps --help fast)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="HTTP API + web page: POST /v1/predict, GET /v1/model, /healthz, / (drop a CXR)",
        description="Serve findings and heatmaps over HTTP (FastAPI + uvicorn). Listens on 127.0.0.1 unless "
                    "--host says otherwise; the API spec is at /docs and /openapi.json.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="images per model call (micro-batch)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--queue-size", type=int, default=64, help="requests admitted at once; more get 503")
    p.add_argument("--max-upload-mb", type=float, default=64.0)
    p.add_argument("--max-image-side", type=int, default=8192, help="rows/columns limit of uploaded images")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="rows x columns limit, checked from the header before decoding (default 25 M: a CXR is "
                        "at most ~4300x4300)")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="uploads decoded or run at once (default: the CPU cores); the rest wait --busy-wait-s")
    p.add_argument("--busy-wait-s", type=float, default=10.0,
                   help="how long an upload waits for a decode slot before 503 + Retry-After")
    p.add_argument("--cache-size", type=int, default=32, help="recent predictions kept for the page's heatmaps")
    p.add_argument("--threads", type=int, help="PyTorch compute threads (default: PyTorch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from chexfound.serve.app import ServeSettings, create_app
    from chexfound.serve.limits import available_cores

    if args.max_batch < 1 or args.queue_size < 1 or (args.decode_workers is not None and args.decode_workers < 1):
        raise ConfigError(None, "--max-batch, --queue-size and --decode-workers must be >= 1")
    if args.max_image_pixels < 1 or args.busy_wait_s < 0:
        raise ConfigError(None, "--max-image-pixels must be >= 1 and --busy-wait-s >= 0")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    predictor = load_predictor(args)
    if predictor.compiled:  # compile every padded batch shape before the first request, not during it
        b = 1
        while b < 2 * args.max_batch:
            predictor.warmup(min(b, args.max_batch))
            b *= 2
    settings = ServeSettings(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_image_side=args.max_image_side,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
        cache_size=args.cache_size, max_image_pixels=args.max_image_pixels,
        decode_workers=args.decode_workers or available_cores(), busy_wait_s=args.busy_wait_s)
    app = create_app(predictor, settings)
    if not _is_loopback(args.host):
        log.warning("listening on %s: reachable from other machines, with no authentication or TLS; put it "
                    "behind a proxy that provides them", args.host)
    log.info("chexfound serve: http://%s:%d/ (API docs at /docs)", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
