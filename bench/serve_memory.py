"""Memory of `chexfound serve` under hostile and heavy uploads (loopback only, bounded in count and time).

A `chexfound serve` process on 127.0.0.1 (ViT-S/16 224 px, random weights, linear head) receives, each wave
40 uploads at once, while a poller asks /healthz every 100 ms:

  1. 40 x a valid 8000 x 8000 16-bit PNG (~124 KB of bytes, ~680 MB once decoded): refused from the header;
  2. 40 x the largest real CXR size, 4300 x 4300 16-bit (a real NIH image resized): decoded at most
     `--decode-workers` at a time, the rest queued up to `--busy-wait-s` then 503.

Printed per wave: the server's peak RSS (its process and children, sampled every 20 ms) against its idle RSS
measured in the same run, the answers by status code, and /healthz's worst latency and failures.
`--old-limits` adds a first server with the limits as they were (8192 per side only, 4 decode slots, no
pixel limit) as the reference: expect several GB there.

    python bench/serve_memory.py [--uploads 40] [--decode-workers N] [--old-limits] [--json out.json]
    PYTHONPATH=src python bench/serve_memory.py --smoke      # seconds: 3 uploads a wave (figures mean nothing)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _serve import make_model, serve_process  # noqa: E402
from _timing import Stopwatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from chexfound.data.findings import NIH14  # noqa: E402

DATA = Path(os.environ.get("CHEXFOUND_DATA", ROOT.parent / "shared" / "data"))


def png16(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def hostile_png(side: int = 8000) -> bytes:
    """A valid, highly compressible 16-bit PNG of side x side (mostly flat, a faint gradient)."""
    return png16(np.broadcast_to((np.arange(side, dtype=np.uint32) // 64).astype(np.uint16)[None], (side, side)))


def largest_cxr_png(side: int = 4300) -> bytes:
    """A real NIH radiograph resized to side x side, 16-bit: the largest upload a CXR can honestly be."""
    src = (sorted((DATA / "nih14-fullres" / "images").glob("*.png"))[:1]
           or sorted((DATA / "nih14" / "images").glob("*.png"))[:1])
    if not src:
        raise SystemExit(f"no NIH PNGs under {DATA}: set CHEXFOUND_DATA")
    im = Image.open(src[0]).convert("F").resize((side, side), Image.BILINEAR)
    a = np.asarray(im, dtype=np.float64)
    return png16((a - a.min()) / max(a.max() - a.min(), 1e-6) * 65535)


def rss(p: psutil.Process) -> int:
    """Resident memory of the server and any children it started."""
    total = 0
    for q in [p, *p.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += q.memory_info().rss
    return total


def wave(url: str, proc: psutil.Process, body: bytes, name: str, n: int, timeout_s: float) -> dict[str, Any]:
    """n uploads at once, RSS sampled every 20 ms and /healthz polled every 100 ms until all have answered."""
    done = threading.Event()
    peak = [rss(proc)]
    health: list[float] = []
    health_fail = [0]
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss(proc))
            time.sleep(0.02)

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=5.0) as c:
            while not done.is_set():
                t = time.perf_counter()
                try:
                    ok = c.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    health.append(time.perf_counter() - t) if ok else health_fail.__setitem__(0, health_fail[0] + 1)
                time.sleep(0.1)

    def upload() -> None:
        try:
            with httpx.Client(base_url=url, timeout=timeout_s) as c:
                code = str(c.post("/v1/predict", files={"file": (name, body)}).status_code)
        except httpx.HTTPError as e:
            code = type(e).__name__
        with lock:
            codes[code] = codes.get(code, 0) + 1

    watchers = [threading.Thread(target=sample), threading.Thread(target=poll)]
    for th in watchers:
        th.start()
    clients = [threading.Thread(target=upload) for _ in range(n)]
    with Stopwatch() as sw:
        for th in clients:
            th.start()
        for th in clients:
            th.join(timeout_s + 10)
    wall = sw.seconds
    time.sleep(0.3)  # a last sample after the answers
    done.set()
    for th in watchers:
        th.join()
    return {"uploads": n, "upload_bytes": len(body), "codes": codes, "peak_rss_mb": peak[0] / 2**20,
            "wall_s": wall, "healthz_polls": len(health), "healthz_failures": health_fail[0],
            "healthz_max_ms": 1e3 * max(health) if health else float("nan")}


def run_server(label: str, backbone: Path, head: Path, extra: list[str], bodies: dict[str, bytes],
               n: int, timeout_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"args": extra}
    with serve_process(backbone, head, extra, log_level="error") as (url, server):
        proc = psutil.Process(server.pid)
        time.sleep(1.0)
        out["idle_rss_mb"] = idle = rss(proc) / 2**20
        print(f"[{label}] server idle RSS {idle:.0f} MB ({' '.join(extra) or 'defaults'})", flush=True)
        for name, body in bodies.items():
            r = wave(url, proc, body, name, n, timeout_s)
            out[name] = r
            print(f"[{label}] {n} x {name} ({len(body) / 1024:.0f} KB): peak RSS {r['peak_rss_mb']:.0f} MB = "
                  f"{r['peak_rss_mb'] / idle:.2f}x idle, +{r['peak_rss_mb'] - idle:.0f} MB | answers {r['codes']} "
                  f"in {r['wall_s']:.1f} s | /healthz {r['healthz_polls']} ok, {r['healthz_failures']} failed, "
                  f"worst {r['healthz_max_ms']:.0f} ms", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uploads", type=int, default=40, help="uploads per wave, all at once (at most 64)")
    ap.add_argument("--decode-workers", type=int, help="the server's decode slots (default: its own, the cores)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-upload client timeout, seconds")
    ap.add_argument("--old-limits", action="store_true", help="also run the old limits first, as the reference")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true", help="seconds: 3 uploads a wave, every code path once")
    args = ap.parse_args()
    if args.smoke:
        args.uploads = 3
    n = min(max(1, args.uploads), 64)
    print(f"load: {os.getloadavg()[0]:.1f} (1-min average, {os.cpu_count()} CPUs)", flush=True)
    bodies = {"hostile_8000x8000_16bit.png": hostile_png(), "cxr_4300x4300_16bit.png": largest_cxr_png()}
    results: dict[str, Any] = {"load_1min": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        backbone, head = make_model(Path(tmp), "vits16_224", NIH14)
        if args.old_limits:
            old = ["--max-image-pixels", str(2**31), "--decode-workers", "4", "--busy-wait-s", "120"]
            results["old_limits"] = run_server("old limits", backbone, head, old,
                                               {"hostile_8000x8000_16bit.png": bodies["hostile_8000x8000_16bit.png"]},
                                               n, args.timeout)
        extra = [] if args.decode_workers is None else ["--decode-workers", str(args.decode_workers)]
        results["limits"] = new = run_server("limits", backbone, head, extra, bodies, n, args.timeout)
    peak = max(new[k]["peak_rss_mb"] for k in bodies)
    ok = peak < 4096 and all(new[k]["healthz_failures"] == 0 for k in bodies)
    print(f"peak RSS with the limits {peak:.0f} MB ({'under' if peak < 4096 else 'OVER'} 4 GB); /healthz "
          f"{'answered throughout' if ok else 'FAILED at times'}")
    if "old_limits" in results:
        o = results["old_limits"]["hostile_8000x8000_16bit.png"]["peak_rss_mb"]
        lim = new["hostile_8000x8000_16bit.png"]["peak_rss_mb"]
        print(f"old limits: {o:.0f} MB for the hostile wave, {o / lim:.1f}x the limited server's")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
