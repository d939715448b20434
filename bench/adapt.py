"""Benchmark of head training: cached features vs recomputing the backbone, and a 13-lr grid vs one head.

    python bench/adapt.py                       # ViT-S/16 224 px (random init), 32 NIH images, CPU
    python bench/adapt.py --backbone chexfound_vitl16_reg4_512 --images 256 --device cuda
    python bench/adapt.py --smoke               # seconds: the tiny test backbone, 8 images (checks the code)

Prints, all measured in this process:
  - time per epoch of head training from the feature cache vs with the backbone recomputed every epoch
    (image decoding + transform + frozen forward + the same head step), and their ratio;
  - time per epoch of a 13-learning-rate grid vs a single head from the cache, vs 13 single heads, and vs the
    time 13 heads' FLOPs (counted with torch's FlopCounterMode) take at this machine's fp32 matmul peak
    (a 2048^3 matmul, measured here with the same threads): the share of the peak the grid reaches.

    python bench/adapt.py --backbone vits16_cpu_smoke_shaped.safetensors --images 128 --heads glori --threads 1

The grid shares everything that does not depend on a config's weights: reading and converting the cached
features (the cost that dominates with ViT-L/512 caches on disk: 8 MB per image), batching, label lookup,
Python overhead, and runs the configs as one vmapped, batched computation. A linear probe's grid is therefore
a small multiple of one head. GLoRI's own arithmetic (embedding + attention over every patch, per config) is
not shareable; where it dominates (small in-memory caches on a CPU) the grid costs close to 13 heads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from _timing import Stopwatch, smoke_mode, sync as _sync  # noqa: E402

from chexfound.adapt import GloriHead, LinearHead  # noqa: E402
from chexfound.adapt.token_cache import FeatureCache  # noqa: E402
from chexfound.models.extract import resolve_dtype  # noqa: E402
from chexfound.adapt.grid import HeadGrid  # noqa: E402
from chexfound.adapt.losses import build_loss  # noqa: E402
from chexfound.adapt.fit import DEFAULT_LRS, fit_heads  # noqa: E402
from chexfound.data.manifest import read_manifest  # noqa: E402
from chexfound.data.transform import InputTransform  # noqa: E402
from chexfound.models import create_backbone  # noqa: E402


def _make_head(kind: str, findings: list[str], n_blocks: int, dim: int):
    if kind == "glori":
        return lambda: GloriHead(findings, n_blocks, embed_dim=dim)
    return lambda: LinearHead(findings, n_blocks, embed_dim=dim)


def epoch_from_cache(make, cache, y, lrs, batch_size, dev, epochs) -> float:
    """Median seconds per epoch over `epochs` (the first epoch is a warm-up and not counted)."""
    res = fit_heads(make, cache, y, lrs=lrs, epochs=epochs + 1, batch_size=batch_size, device=dev, seed=0)
    per = sorted({h["epoch"]: h["epoch_seconds"] for h in res.history if h["epoch"] > 1}.values())
    return float(np.median(per))


CLOCK = time.perf_counter  # --cpu-time: time.process_time (a shared machine's other jobs do not count)


def use_cpu_time() -> None:
    """Time everything, fit_heads' own epoch timer included, in this process's CPU seconds."""
    global CLOCK
    import types

    import chexfound.adapt.fit as fit_module

    CLOCK = time.process_time
    fit_module.time = types.SimpleNamespace(perf_counter=time.process_time)  # type: ignore[attr-defined]


def matmul_peak(dev: torch.device, n: int = 2048, reps: int = 5) -> float:
    """fp32 FLOP/s of an n^3 matmul on `dev` (best of `reps`: the peak)."""
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    a @ b
    times = []
    for _ in range(reps):
        _sync(dev)
        t0 = CLOCK()
        a @ b
        _sync(dev)
        times.append(CLOCK() - t0)
    return 2 * n**3 / float(np.min(times))


def head_step_flops(make, cache, y, batch_size: int, dev: torch.device) -> float:
    """FLOPs of one training step (forward + backward) of one head on a full batch."""
    from torch.utils.flop_counter import FlopCounterMode

    grid = HeadGrid(make().to(dev), [1e-3], [1e-4])
    loss_fn = build_loss("multilabel", "bce", y, y.shape[1])
    idx = np.arange(min(batch_size, len(cache)))
    feats = tuple((p.to(dev), c.to(dev)) for p, c in cache.features(idx))
    with FlopCounterMode(display=False) as fc:
        grid.train_step(feats, torch.as_tensor(y[idx]).to(dev), loss_fn, 1.0)
    return float(fc.get_total_flops()) * batch_size / len(idx)


def epoch_recomputing(make, backbone, paths, y, tf, n_blocks, batch_size, dev, dtype, epochs, workers) -> float:
    from torch.utils.data import DataLoader

    from chexfound.data.datasets import ImageDataset, collate_skip_errors

    grid = HeadGrid(make().to(dev), [1e-3], [1e-4])
    loss_fn = build_loss("multilabel", "bce", y, y.shape[1])
    yt = torch.as_tensor(y)
    loader = DataLoader(ImageDataset(paths, tf), batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate_skip_errors)
    times = []
    for epoch in range(epochs + 1):
        _sync(dev)
        t0 = CLOCK()
        for batch in loader:
            x = batch["image"].to(dev)
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                feats = backbone.get_intermediate_layers(x, n=n_blocks, return_class_token=True)
            feats = tuple((p.float().clone(), c.float().clone()) for p, c in feats)
            grid.train_step(feats, yt[batch["index"]].to(dev), loss_fn, 1.0)
        _sync(dev)
        if epoch:
            times.append(CLOCK() - t0)
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vits16_224", help="a named architecture (random weights) or a backbone file")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs (after one warm-up)")
    ap.add_argument("--heads", default="linear,glori")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="CPU seconds of this process instead of wall time (a shared CPU; use with --threads 1)")
    ap.add_argument("--no-recompute", action="store_true", help="skip the recomputing-backbone comparison")
    ap.add_argument("--data", default=os.environ.get("CHEXFOUND_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny_vit, 8 images (timings mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        smoke_mode()
        args.backbone, args.images, args.batch_size, args.epochs = "tiny_vit", 8, 4, 1
    dev, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        use_cpu_time()
    torch.manual_seed(0)
    backbone = create_backbone(args.backbone).to(dev).eval()
    n_blocks = min(4, len(backbone.blocks))
    m = read_manifest(Path(args.data) / "nih14" / "labels.csv")
    m = m.subset(np.arange(len(m)) < args.images)
    y = m.labels()
    findings = list(m.label_columns)
    tf = InputTransform.for_backbone(backbone.cfg)
    print(f"backbone {args.backbone} ({sum(p.numel() for p in backbone.parameters()) / 1e6:.1f} M params, "
          f"{tf.size}px), {len(m)} images, batch {args.batch_size}, device {dev}, {n_blocks} blocks, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    peak = matmul_peak(dev)
    print(f"fp32 matmul peak (2048^3): {peak / 1e9:.0f} GFLOP/s ({'CPU' if args.cpu_time else 'wall'} time)")
    with tempfile.TemporaryDirectory() as tmp:
        with Stopwatch(dev) as sw:
            cache = FeatureCache.build(backbone, m, Path(tmp) / "cache", n_blocks=n_blocks,
                                       batch_size=args.batch_size, device=dev, dtype=dtype, workers=args.workers)
        print(f"cache build (one-off): {sw.seconds:.2f} s")
        for kind in args.heads.split(","):
            make = _make_head(kind, findings, n_blocks, backbone.embed_dim)
            cached = epoch_from_cache(make, cache, y, [1e-3], args.batch_size, dev, args.epochs)
            if not args.no_recompute:
                live = epoch_recomputing(make, backbone, m.paths(), y, tf, n_blocks, args.batch_size, dev, dtype,
                                         args.epochs, args.workers)
                print(f"[{kind}] epoch from cache {cached:.3f} s | recomputing backbone {live:.3f} s | "
                      f"ratio {live / cached:.1f}x faster from cache")
            grid13 = epoch_from_cache(make, cache, y, list(DEFAULT_LRS), args.batch_size, dev, args.epochs)
            g = len(DEFAULT_LRS)
            print(f"[{kind}] 13-lr grid {grid13:.3f} s vs 1 head {cached:.3f} s per epoch: "
                  f"{grid13 / cached:.2f}x the cost of one head for 13 heads ({grid13 / (g * cached):.2f}x 13 heads)")
            flops = head_step_flops(make, cache, y, args.batch_size, dev) * len(m) / args.batch_size
            ideal = g * flops / peak
            print(f"[{kind}] one head: {flops / 1e9:.1f} GFLOP per epoch (forward + backward); 13 heads at the "
                  f"matmul peak {ideal:.3f} s: the grid takes {grid13 / ideal:.2f}x that ({ideal / grid13:.0%} of "
                  f"peak), one head alone {cached / (flops / peak):.2f}x ({flops / peak / cached:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
