"""Every GPU figure of the user path in one run (<= 4 minutes on one GPU), each as a ratio to a reference
measured in the same process:

  1. peak       bf16 matmul peak (the reference for every "% of peak")
  2. forward    backbone img/s and % of peak, ViT-L/16-512 and ViT-S/16-224: ours eager vs the original's
                explicit attention, SDPA backends, per-block torch.compile, CUDA graphs (outputs checked
                against eager within bf16 tolerance)
  3. decode     read + transform rate per CPU core for PNG, JPEG and DICOM (J2K), and the loader workers a
                model rate needs
  4. embed      `chexfound embed` end to end from real 512-px files (workers decoding, uint8 pinned
                transfer, normalisation on the device, forward, token cache + pooled file written) vs the
                model-only rate, with where the time goes
  5. heads      head training from that cache: GLoRI and linear, the 13-lr grid vs one head (s/epoch)
  6. serve      `Predictor` throughput, p50/p95 latency at batch 1 and under micro-batching

    PYTHONPATH=src python bench/gpu.py --json gpu.json            # one GPU, real data in ../shared/data
    PYTHONPATH=src python bench/gpu.py --smoke --json /tmp/s.json  # CPU: tiny sizes, checks the code paths

Runs from a source tree without installing (torch, numpy, pandas, scikit-learn, safetensors; PIL for real
images; pydicom optional: DICOM decode rates are skipped without it). A section that cannot run (no data, a
missing package) is recorded as skipped with the reason; the others still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from _timing import CPU, Stopwatch, best_seconds, matmul_peak, rate, smoke_mode, sync  # noqa: E402
from backbone import RefViT, _randomised, vit_flops  # noqa: E402

from chexfound.models.config import ViTConfig  # noqa: E402
from chexfound.models.inference import CudaGraphForward, InferenceSettings, compile_blocks, run_context  # noqa: E402
from chexfound.models.registry import get_config  # noqa: E402


@dataclass
class Sizes:
    """What one run measures. `gpu()` is the real thing; `smoke()` is seconds on a CPU."""

    large: str = "chexfound_vitl16_reg4_512"
    large_size: int = 512
    large_batch: int = 64
    small: str = "vits16_224"
    small_size: int = 224
    small_batch: int = 512
    peak_n: int = 8192
    iters: int = 5
    embed_images: int = 1024
    embed_batch: int = 64
    workers: int = max(1, (os.cpu_count() or 2) - 2)
    head_images: int = 512
    head_batch: int = 64
    serve_requests: int = 200
    serve_clients: int = 32
    compile: bool = True
    dtype: str = "bf16"

    @classmethod
    def smoke(cls) -> "Sizes":
        return cls(large="tiny_vit", large_size=64, large_batch=4, small="tiny_vit", small_size=32,
                   small_batch=4, peak_n=256, iters=1, embed_images=12, embed_batch=4, workers=0, head_images=12,
                   head_batch=4, serve_requests=8, serve_clients=4, compile=False, dtype="fp32")


@dataclass
class Report:
    device: str
    figures: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


_MODELS: dict[str, torch.nn.Module] = {}


def random_model(cfg: ViTConfig) -> torch.nn.Module:
    """Trained-like random weights, made once per config (a ViT-L takes seconds to initialise on a CPU)."""
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _MODELS:
        _MODELS[key] = _randomised(cfg)
    return _MODELS[key]


def amp(dev: torch.device, dtype: str) -> Callable[[], Any]:
    return run_context(dev, InferenceSettings(compute=dtype))


# ---------------------------------------------------------------- 2. forward
def bench_forward(name: str, size: int, batch: int, sz: Sizes, dev: torch.device, peak: float,
                  rep: Report) -> float:
    """img/s of each variant; returns the best variant's img/s (the model-only rate for the embed section)."""
    cfg: ViTConfig = replace(get_config(name), img_size=size)
    model = random_model(cfg).to(dev).eval()
    ref = RefViT(cfg).to(dev).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(batch, 3, size, size, device=dev)
    flops = vit_flops(cfg, size) * batch
    ctx = amp(dev, sz.dtype)
    n = min(4, cfg.depth)

    def ours(m: torch.nn.Module, backend: str = "auto") -> Callable[[], object]:
        run = run_context(dev, InferenceSettings(compute=sz.dtype, sdpa=backend))

        def f() -> object:
            with torch.inference_mode(), run():
                return m.get_intermediate_layers(x, n=n, return_class_token=True)
        return f

    def reference() -> object:
        with torch.inference_mode(), ctx():
            return ref.get_intermediate_layers(x, n)

    variants: dict[str, Callable[[], object]] = {"reference (explicit attention)": reference, "ours eager": ours(model)}
    if dev.type == "cuda":
        for backend in ("flash", "cudnn", "efficient"):
            variants[f"ours eager, sdpa={backend}"] = ours(model, backend)
    if sz.compile:
        with Stopwatch(dev) as sw:
            compiled = compile_blocks(model)
            ours(compiled)()  # the compile itself, timed apart
        rep.seconds[f"compile {name}"] = round(sw.seconds, 1)
        variants["ours compiled"] = ours(compiled)
        if dev.type == "cuda":
            graph = CudaGraphForward(compiled, n, ctx)

            def graphed() -> object:
                with torch.inference_mode():
                    return graph(x)
            variants["ours compiled + CUDA graph"] = graphed
    with torch.inference_mode():
        eager = ours(model)()
    rows = {}
    t_ref = None
    for label, fn in variants.items():
        try:
            t = best_seconds(fn, iters=sz.iters, dev=dev)
        except Exception as e:  # e.g. a backend this GPU or build lacks: say so, keep going
            rows[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        t_ref = t if label.startswith("reference") else t_ref
        out = fn()
        diff = max(float((a[1].float() - b[1].float()).abs().max() / b[1].float().abs().max())
                   for a, b in zip(out, eager)) if not label.startswith("reference") else None
        rows[label] = {"img_s": batch / t, "tflop_s": flops / t / 1e12, "pct_of_peak": 100 * flops / t / peak,
                       "x_reference": (t_ref / t) if t_ref else None, "max_rel_diff_vs_eager": diff}
    for label, r in rows.items():
        if "error" in r:
            print(f"  {label:32s} {r['error']}")
        else:
            print(f"  {label:32s} {r['img_s']:9.1f} img/s  {r['tflop_s']:7.1f} TFLOP/s  {r['pct_of_peak']:5.1f}% of "
                  f"peak  x{(r['x_reference'] or 0):.2f} vs reference"
                  + (f"  rel diff {r['max_rel_diff_vs_eager']:.1e}" if r["max_rel_diff_vs_eager"] is not None else ""))
    rep.figures[f"forward {name} @ {size}px batch {batch} {sz.dtype}"] = rows
    return max(r["img_s"] for k, r in rows.items() if "img_s" in r and not k.startswith("reference"))


# ---------------------------------------------------------------- 3. decode
def bench_decode(root: Path, rep: Report, seconds: float) -> dict[str, float]:
    """Images/s of read_image + InputTransform(512).prepare (uint8) in one process with one thread: what one
    loader worker (one CPU core) delivers, per format."""
    from chexfound.data.transform import InputTransform
    from chexfound.io import read_image

    sets = {"PNG 8-bit 512 px (NIH)": sorted((root / "nih14" / "images").glob("*.png"))[:64],
            "PNG 8-bit 1024 px (NIH)": sorted((root / "nih14-fullres" / "images").glob("*.png"))[:12],
            "JPEG 224 px (Kermany)": sorted((root / "kermany" / "dataset" / "test" / "PNEUMONIA").glob("*.jpeg"))[:40]}
    try:
        import pydicom  # noqa: F401

        d = root / "dicom"
        sets.update({"DICOM uncompressed 1955x1841": [d / "RG1_UNCR.dcm"],
                     "DICOM JPEG baseline 1024 px": sorted(d.glob("siim_*.dcm")),
                     "DICOM JPEG 2000 lossless": [d / "RG1_J2KR.dcm"],
                     "DICOM JPEG 2000 lossy": [d / "RG1_J2KI.dcm"]})
    except ImportError:
        rep.skipped["decode DICOM"] = "pydicom is not installed here"
    tf = InputTransform(size=512)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates: dict[str, float] = {}
    try:
        for label, files in sets.items():
            files = [f for f in files if Path(f).is_file()]
            if not files:
                rep.skipped[f"decode {label}"] = "no such files"
                continue
            tf.prepare(read_image(files[0]).pixels, torch.uint8)
            # CPU time of this thread: the rate of one core, whatever else the machine is running.
            nxt = iter(range(1 << 62))
            rates[label] = rate(lambda files=files: tf.prepare(read_image(files[next(nxt) % len(files)]).pixels,
                                                               torch.uint8), seconds, min_calls=3, clock=CPU)
            print(f"  {label:32s} {rates[label]:8.1f} img/s per core")
    finally:
        torch.set_num_threads(threads)
    rep.figures["decode img/s per core (read + resize to 512 + min-max, uint8)"] = rates
    return rates


# ---------------------------------------------------------------- 4. embed
def bench_embed(root: Path, sz: Sizes, dev: torch.device, model_rate: float, tmp: Path,
                rep: Report) -> Path | None:
    """`chexfound embed` end to end; returns the token cache folder for the heads section."""
    from chexfound.adapt.token_cache import TokenCacheWriter
    from chexfound.data.transform import InputTransform
    from chexfound.models.embedder import EmbedSettings, run_engine
    from chexfound.models.pooled_file import PooledFileWriter

    files = sorted((root / "nih14" / "images").glob("*.png"))
    if not files:
        rep.skipped["embed"] = f"no NIH images under {root}"
        return None
    paths = [str(files[i % len(files)]) for i in range(sz.embed_images)]  # repeats: same decode work
    ids = [f"{i}:{Path(p).name}" for i, p in enumerate(paths)]
    cfg = replace(get_config(sz.large), img_size=sz.large_size)
    model = random_model(cfg)
    tf = InputTransform.for_backbone(cfg)
    n = min(4, cfg.depth)
    st = EmbedSettings(n_blocks=n, batch_size=sz.embed_batch, chunk_size=4 * sz.embed_batch, workers=sz.workers,
                       autocast=sz.dtype, compile=sz.compile, pack=dev.type == "cpu")
    result: dict[str, Any] = {"model_only_img_s": model_rate, "workers": sz.workers,
                              "cache_bytes_per_image": 2 * n * (cfg.num_patches + 1) * cfg.embed_dim}
    for label, tokens in (("pooled file (embed --out)", False), ("pooled file + token cache (--tokens)", True)):
        out = tmp / ("embed-tokens" if tokens else "embed")
        sinks: list[Any] = [PooledFileWriter(out / "pooled.safetensors", paths, ids, n_blocks=n,
                                             chunk_size=st.chunk_size)]
        if tokens:
            sinks.append(TokenCacheWriter(out / "tokens", model, paths, ids, tf, n))
        sync(dev)
        run = run_engine(model, tf, paths, sinks, st, dev, progress=False)
        sync(dev)
        work = run.seconds - run.timings.get("prepare_model", 0.0)
        rate = run.images / work
        split = {k: round(v / work, 3) for k, v in run.timings.items() if k != "prepare_model"}
        print(f"  {label:38s} {rate:8.1f} img/s with {sz.workers} workers = {100 * rate / model_rate:5.1f}% of "
              f"the model-only {model_rate:.1f} img/s; share of time: {split}")
        result[label] = {"img_s": rate, "pct_of_model_only": 100 * rate / model_rate, "images": run.images,
                         "share_of_time": split, "seconds_excluding_model_preparation": work,
                         "model_preparation_s": run.timings.get("prepare_model", 0.0)}
    rep.figures["embed end to end from 512-px PNG files"] = result
    return out / "tokens"


# ---------------------------------------------------------------- 5. heads
def bench_heads(cache_dir: Path, sz: Sizes, dev: torch.device, rep: Report) -> None:
    from chexfound.adapt import GloriHead, LinearHead
    from chexfound.adapt.fit import DEFAULT_LRS, fit_heads
    from chexfound.adapt.token_cache import FeatureCache

    cache = FeatureCache.open(cache_dir)
    rows = np.arange(min(len(cache), sz.head_images))
    rng = np.random.default_rng(0)
    y = (rng.random((len(cache), 14)) < 0.2).astype(np.float32)
    d, nb = int(cache.meta["embed_dim"]), cache.n_blocks
    findings = [f"f{i}" for i in range(14)]
    makers = {"glori": lambda: GloriHead(findings, nb, embed_dim=d),
              "linear": lambda: LinearHead(findings, nb, embed_dim=d, avgpool=True)}
    out: dict[str, Any] = {}
    for kind, make in makers.items():
        per: dict[str, float] = {}
        for label, lrs in (("one head", DEFAULT_LRS[6:7]), ("13-lr grid", DEFAULT_LRS)):
            res = fit_heads(make, cache, y, lrs=lrs, epochs=2, batch_size=sz.head_batch, device=dev,
                            train_indices=rows, seed=0)
            per[label] = [h["epoch_seconds"] for h in res.history if h["epoch"] == 2][0]  # epoch 1 warms up
        out[kind] = {"s_per_epoch_one_head": per["one head"], "s_per_epoch_grid13": per["13-lr grid"],
                     "grid_over_one": per["13-lr grid"] / per["one head"], "images": len(rows)}
        print(f"  {kind:7s} one head {per['one head']:7.2f} s/epoch, 13-lr grid {per['13-lr grid']:7.2f} s/epoch "
              f"= x{per['13-lr grid'] / per['one head']:.2f}  ({len(rows)} images)")
    rep.figures["head training from the token cache"] = out


# ---------------------------------------------------------------- 6. serve
def bench_serve(sz: Sizes, dev: torch.device, rep: Report) -> None:
    from chexfound.adapt import GloriHead
    from chexfound.serve.batching import MicroBatcher
    from chexfound.serve.predictor import Predictor

    cfg = replace(get_config(sz.large), img_size=sz.large_size)
    model = random_model(cfg)
    head = GloriHead([f"f{i}" for i in range(14)], min(4, cfg.depth), embed_dim=cfg.embed_dim)
    out: dict[str, Any] = {}
    for compiled in ([False, True] if sz.compile else [False]):
        p = Predictor(model, head, device=dev, precision=sz.dtype, compile=compiled)
        one = torch.randn(1, 3, sz.large_size, sz.large_size)
        for _ in range(3):
            p.predict_tensor(one)  # warm-up (and compile)
        lat = []
        for _ in range(max(10, sz.serve_requests // 4)):
            t = time.perf_counter()
            p.predict_tensor(one)
            lat.append(time.perf_counter() - t)
        full = torch.randn(sz.embed_batch, 3, sz.large_size, sz.large_size)
        t_full = best_seconds(lambda: p.predict_tensor(full), iters=sz.iters, dev=dev)
        batcher = MicroBatcher(p.predict_tensor, max_batch=16, max_wait_ms=5.0,
                               capacity=4 * sz.serve_clients).start()
        for b in (2, 4, 8, 16):  # every shape the batcher can produce (compiled: padded to powers of two)
            p.predict_tensor(torch.randn(b, 3, sz.large_size, sz.large_size))
        mb_lat: list[float] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            x = torch.randn(3, sz.large_size, sz.large_size)
            for _ in range(k):
                t = time.perf_counter()
                with batcher.reserve() as slot:
                    fut: Future = slot.submit(x)
                    fut.result()
                with lock:
                    mb_lat.append(time.perf_counter() - t)

        per_client = max(1, sz.serve_requests // sz.serve_clients)
        threads = [threading.Thread(target=client, args=(per_client,)) for _ in range(sz.serve_clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        batcher.stop()
        key = "compiled" if compiled else "eager"
        out[key] = {"batch1_p50_ms": 1e3 * statistics.median(lat), "batch1_p95_ms": 1e3 * float(np.percentile(lat, 95)),
                    "batch1_img_s": 1 / statistics.median(lat), f"batch{sz.embed_batch}_img_s": sz.embed_batch / t_full,
                    "microbatch_img_s": len(mb_lat) / wall, "microbatch_p50_ms": 1e3 * statistics.median(mb_lat),
                    "microbatch_p95_ms": 1e3 * float(np.percentile(mb_lat, 95)), "clients": sz.serve_clients,
                    "mean_batch": batcher.stats.to_dict()["mean_batch"]}
        r = out[key]
        print(f"  {key:8s} batch 1: p50 {r['batch1_p50_ms']:.1f} ms p95 {r['batch1_p95_ms']:.1f} ms; batch "
              f"{sz.embed_batch}: {r[f'batch{sz.embed_batch}_img_s']:.1f} img/s; micro-batched ({sz.serve_clients} "
              f"clients): {r['microbatch_img_s']:.1f} img/s p50 {r['microbatch_p50_ms']:.1f} ms p95 "
              f"{r['microbatch_p95_ms']:.1f} ms (mean batch {r['mean_batch']:.1f})")
    if "eager" in out:
        e = out["eager"]
        out["microbatch_over_batch1_throughput"] = e["microbatch_img_s"] / e["batch1_img_s"]
    rep.figures["serve (Predictor, GLoRI head)"] = out


# ---------------------------------------------------------------- driver
def section(rep: Report, name: str, fn: Callable[[], Any]) -> Any:
    print(f"\n[{name}]", flush=True)
    t = time.perf_counter()
    try:
        return fn()
    except ImportError as e:
        rep.skipped[name] = f"missing package: {e}"
        print(f"  skipped: {rep.skipped[name]}")
    except Exception as e:  # one failing section must not cost the rest of a GPU session
        rep.errors[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
        print(f"  ERROR: {type(e).__name__}: {e}")
    finally:
        rep.seconds[name] = round(time.perf_counter() - t, 1)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes (a CPU check of every code path; its timings mean nothing)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", default=os.environ.get("CHEXFOUND_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile / CUDA-graph variants")
    ap.add_argument("--workers", type=int, help="loader workers for the embed section (default: cores - 2)")
    ap.add_argument("--sections", default="peak,forward,decode,embed,heads,serve")
    ap.add_argument("--tmp", help="scratch folder for the embed outputs (a ViT-L/512 token cache is 8 MB per image; "
                                  "default: the system's temp folder)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    sz = Sizes.smoke() if args.smoke or dev.type != "cuda" else Sizes()
    if sz.iters == 1:  # smoke: code paths only; one thread avoids OpenMP stalls on a shared CPU
        torch.set_num_threads(1)
        smoke_mode()  # the tiny test backbones the smoke sizes use
    if args.no_compile:
        sz.compile = False
    if args.workers is not None:
        sz.workers = args.workers
    want = set(args.sections.split(","))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    rep = Report(device=name)
    t0 = time.perf_counter()
    print(f"bench/gpu.py on {name}: torch {torch.__version__}, {'smoke sizes' if sz.iters == 1 else 'full sizes'}, "
          f"{sz.dtype}, compile {'on' if sz.compile else 'off'}, {sz.workers} loader workers")
    dt = torch.bfloat16 if sz.dtype == "bf16" else torch.float32
    peak = section(rep, "peak", lambda: matmul_peak(dt, dev, sz.peak_n)) if "peak" in want else None
    peak = peak or float("nan")
    if "peak" in want and math.isfinite(peak):
        rep.figures[f"{sz.dtype} matmul peak TFLOP/s"] = peak / 1e12
        print(f"  {peak / 1e12:.3g} TFLOP/s ({sz.peak_n}^3 GEMM)")
    model_rate = None
    if "forward" in want:
        model_rate = section(rep, "forward large", lambda: bench_forward(sz.large, sz.large_size, sz.large_batch, sz,
                                                                         dev, peak, rep))
        section(rep, "forward small", lambda: bench_forward(sz.small, sz.small_size, sz.small_batch, sz, dev, peak,
                                                            rep))
    root = Path(args.data)
    if "decode" in want:
        section(rep, "decode", lambda: bench_decode(root, rep, seconds=0.2 if sz.iters == 1 else 1.0))
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        cache = None
        if "embed" in want:
            cache = section(rep, "embed", lambda: bench_embed(root, sz, dev, model_rate or float("nan"), Path(tmp),
                                                              rep))
        if "heads" in want and cache is not None:
            section(rep, "heads", lambda: bench_heads(cache, sz, dev, rep))
        elif "heads" in want:
            rep.skipped["heads"] = "needs the embed section's token cache"
    if "serve" in want:
        section(rep, "serve", lambda: bench_serve(sz, dev, rep))
    rep.seconds["total"] = round(time.perf_counter() - t0, 1)
    print(f"\nbench/gpu.py took {rep.seconds['total']:.0f} s; skipped: {sorted(rep.skipped) or 'nothing'}; "
          f"errors: {sorted(rep.errors) or 'none'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "sizes": asdict(sz), **asdict(rep)},
                                              indent=1, default=float))
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
