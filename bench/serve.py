"""Serving benchmark (loopback only, bounded to about a minute and a half).

1. HTTP: requests/s and p50/p95 latency of POST /v1/predict for 1, 4 and 16 concurrent clients against a
   `chexfound serve` process (uvicorn) on 127.0.0.1, with a small random-weight model (ViT-S/16 at 224 px + a linear
   head over the 40 CXR-LT findings); throughput is also given relative to one client (micro-batching gain).
2. Runtime: onnxruntime vs PyTorch CPU throughput for the same model at batch 1 and 8, as ratios.

    python bench/serve.py [--seconds 6] [--threads 1] [--backbone vits16_224] [--json out.json]
    python bench/serve.py --smoke     # seconds: the tiny test backbone, short levels (checks the code paths)

Numbers depend on the machine; the ratios compare runs made in this same process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _serve import make_model, serve_process  # noqa: E402
from _timing import interleaved_rates, smoke_mode  # noqa: E402

from chexfound.data.findings import CXRLT24  # noqa: E402
from chexfound.serve import Predictor  # noqa: E402
from chexfound.serve.export import export_onnx, onnx_session  # noqa: E402

DATA = Path(os.environ.get("CHEXFOUND_DATA", ROOT.parent / "shared" / "data"))


def load_level(url: str, body: bytes, name: str, clients: int, seconds: float) -> dict[str, float]:
    """`clients` threads post back-to-back for `seconds`; latencies of completed requests."""
    stop = time.monotonic() + seconds
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60.0) as c:
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = c.post("/v1/predict", files={"file": (name, body)})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                    else:
                        errors[0] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    q = np.percentile(lat, [50, 95]) if lat else [float("nan")] * 2
    return {"clients": clients, "requests": len(lat), "errors": errors[0], "rps": len(lat) / wall,
            "p50_ms": float(q[0]) * 1e3, "p95_ms": float(q[1]) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vits16_224", help="registry config of the random-weight backbone")
    ap.add_argument("--seconds", type=float, default=6.0, help="duration of each measurement")
    ap.add_argument("--threads", type=int, default=1,
                    help="compute threads for PyTorch and onnxruntime alike (default 1: per-core numbers, "
                         "stable on shared machines)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny_vit, 0.5 s per level (timings mean nothing)")
    args = ap.parse_args()
    levels_clients = (1, 4, 16)
    if args.smoke:
        smoke_mode()
        args.backbone, args.seconds, levels_clients = "tiny_vit", 0.5, (1, 4)
    threads = args.threads
    torch.set_num_threads(threads)

    image = sorted((DATA / "nih14" / "images").glob("*.png"))[0]
    body = image.read_bytes()
    results: dict[str, object] = {"backbone": args.backbone, "threads": threads, "image": image.name}
    with tempfile.TemporaryDirectory(prefix="chexfound-bench-") as tmp:
        bb_path, head_path = make_model(Path(tmp), args.backbone, CXRLT24)
        predictor = Predictor(bb_path, head_path, device="cpu")
        size = predictor.transform.size

        # 1. HTTP on loopback: the real `chexfound serve` in its own process (clients here do not share its GIL)
        batching = ["--threads", str(threads), "--max-batch", "16", "--max-wait-ms", "5", "--queue-size", "64"]
        with serve_process(bb_path, head_path, batching) as (url, _):
            load_level(url, body, image.name, 2, min(2.0, args.seconds))  # warm-up
            levels = []
            for clients in levels_clients:
                before = httpx.get(f"{url}/healthz").json()["batcher"]
                lv = load_level(url, body, image.name, clients, args.seconds)
                after = httpx.get(f"{url}/healthz").json()["batcher"]
                batches = after["batches"] - before["batches"]
                lv["mean_batch"] = (after["items"] - before["items"]) / batches if batches else float("nan")
                levels.append(lv)
        base = levels[0]["rps"]
        print(f"HTTP POST /v1/predict, {args.backbone} @ {size}px + linear head (40 findings), {threads} threads")
        print(f"{'clients':>8} {'req/s':>8} {'x 1-client':>10} {'p50 ms':>8} {'p95 ms':>8} {'batch':>6} {'errors':>7}")
        for lv in levels:
            lv["rps_vs_1_client"] = lv["rps"] / base if base else float("nan")
            print(f"{lv['clients']:>8} {lv['rps']:>8.1f} {lv['rps_vs_1_client']:>10.2f} {lv['p50_ms']:>8.1f} "
                  f"{lv['p95_ms']:>8.1f} {lv['mean_batch']:>6.2f} {lv['errors']:>7}")
        results["http"] = levels

        # 2. onnxruntime vs PyTorch, same model, same inputs
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(predictor, onnx_path, verify=True, atol=1e-3)
        sess = onnx_session(onnx_path, threads=threads)
        runtime = []
        print(f"\nonnxruntime vs PyTorch (CPU, {threads} threads), images/s")
        print(f"{'batch':>6} {'torch':>8} {'onnxrt':>8} {'ort/torch':>10}")
        for b in (1, 8):
            x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
            ips = interleaved_rates({"torch": lambda x=x: len(predictor.predict_tensor(torch.from_numpy(x))[0]),
                                     "ort": lambda x=x: len(sess.run(None, {"image": x})[0])}, args.seconds)
            t_torch, t_ort = ips["torch"], ips["ort"]
            runtime.append({"batch": b, "torch_ips": t_torch, "onnxruntime_ips": t_ort, "ratio": t_ort / t_torch})
            print(f"{b:>6} {t_torch:>8.1f} {t_ort:>8.1f} {t_ort / t_torch:>10.2f}")
        results["runtime"] = runtime

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    failed = sum(lv["errors"] for lv in levels)
    if failed:
        print(f"{failed} requests failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
