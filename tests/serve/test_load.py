"""Load on loopback: concurrent clients against a real uvicorn server, bounded in count and time.
Every request must succeed, micro-batches must form, and memory must stay flat after warm-up."""

from __future__ import annotations

import gc
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from chexfound.serve import Predictor
from chexfound.serve.app import ServeSettings, create_app
from chexfound.serve.server import BackgroundServer

CLIENTS = 8
WARMUP_PER_CLIENT = 6
REQUESTS_PER_CLIENT = 25
RSS_GROWTH_LIMIT = 48 * 1024 * 1024  # a leak of one 512-px float image per request would exceed this


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hammer(url: str, body: bytes, name: str, per_client: int) -> list[int]:
    def client(_: int) -> list[int]:
        codes = []
        with httpx.Client(base_url=url, timeout=30.0) as c:
            for _ in range(per_client):
                r = c.post("/v1/predict", files={"file": (name, body)})
                codes.append(r.status_code)
        return codes

    with ThreadPoolExecutor(CLIENTS) as ex:
        return [code for codes in ex.map(client, range(CLIENTS)) for code in codes]


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc (Linux)")
def test_concurrent_clients_no_errors_stable_memory(models: dict[str, Path], small_png: Path) -> None:
    predictor = Predictor(models["backbone"], models["attention"], device="cpu")
    app = create_app(predictor, ServeSettings(max_batch=8, max_wait_ms=20, queue_size=32))
    body = small_png.read_bytes()
    with BackgroundServer(app) as url:
        assert url.startswith("http://127.0.0.1:")
        codes = hammer(url, body, small_png.name, WARMUP_PER_CLIENT)
        assert set(codes) == {200}
        gc.collect()
        before = rss_bytes()
        t0 = time.monotonic()
        codes = hammer(url, body, small_png.name, REQUESTS_PER_CLIENT)
        elapsed = time.monotonic() - t0
        gc.collect()
        after = rss_bytes()
        health = httpx.get(f"{url}/healthz").json()
    assert codes == [200] * (CLIENTS * REQUESTS_PER_CLIENT), {c: codes.count(c) for c in set(codes)}
    assert after - before < RSS_GROWTH_LIMIT, f"RSS grew {(after - before) / 2**20:.1f} MiB"
    stats = health["batcher"]
    assert stats["items"] == CLIENTS * (WARMUP_PER_CLIENT + REQUESTS_PER_CLIENT)
    assert stats["max_batch_seen"] > 1, "concurrent clients never shared a forward pass"
    assert health["in_flight"] == 0 and stats["errors"] == 0 and stats["rejected"] == 0
    print(f"{len(codes)} requests from {CLIENTS} clients in {elapsed:.1f}s, mean batch {stats['mean_batch']:.2f}, "
          f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
