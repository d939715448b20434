"""Pretraining step throughput: images/s, model FLOP utilisation against this device's measured GEMM peak, and
where a step's time goes.

    python bench/pretrain.py                        # ViT-S/16, 224 px, 2 global + 8 local crops, on CPU
    python bench/pretrain.py --device cuda --batch 64 --dtype bf16
    python bench/pretrain.py --config demo_tiny --batch 64   # any preset (+ key=value overrides)

FLOPs of a step (teacher forward + student forward/backward, heads included) are counted by
torch.utils.flop_counter on one step; the peak is a square matmul timed in this process (fp32 on CPU, the
training dtype on GPU), so the utilisation is relative to what this machine does right now (shared CPUs
make absolute numbers noisy; the ratio is the point). Images come from the resident (preload) path:
synthetic uint8 images already on the device, so the data side costs only the batched on-device multi-crop.
A second table compares the two data pipelines alone (decode per step vs gather from the resident corpus).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from chexfound.ssl import distributed as D  # noqa: E402
from chexfound.ssl.config import load_config  # noqa: E402
from chexfound.ssl.timing import StepTimer  # noqa: E402
from chexfound.ssl.train import Trainer  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gemm_peak(dev: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul (the best of a few runs)."""
    n = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(dev)
        best = min(best, (time.perf_counter() - t0) / 3)
    return 2 * n**3 / best


def step_flops(trainer: Trainer, images: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        trainer.train_step(0, images)
    return int(fc.get_total_flops())


def tokens(size: int, patch: int, regs: int) -> int:
    return 1 + regs + (size // patch) ** 2


def data_paths(dev: torch.device, cfg: dict, batch: int, workers: int, n_batches: int) -> list[tuple[str, float]]:
    """images/s of each data pipeline alone (no model): loader (decode each step) vs resident gather."""
    from chexfound.ssl.data import LoaderSource, PreloadedSource, Skipped, corpus_paths
    from chexfound.ssl.sampler import ShardedStreamSampler

    data = Path(os.environ.get("CHEXFOUND_DATA", ROOT.parent / "shared" / "data")) / "kermany"
    if not data.is_dir():
        return []
    paths = corpus_paths([{"path": str(data)}], "train")[: batch * (n_batches + 2) * 2]
    size = int(cfg["crops"]["global_crops_size"])
    sampler = ShardedStreamSampler(len(paths), batch, seed=0)
    out = []
    loader = LoaderSource(paths, size, sampler, dev, workers, Skipped())
    it = loader.batches(0)
    next(it)  # worker start-up
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    sync(dev)
    out.append((f"loader ({workers} workers, decode + resize per step)", n_batches * batch / (time.perf_counter() - t0)))
    imgs = torch.randint(0, 256, (len(paths), 1, size, size), dtype=torch.uint8)
    res = PreloadedSource(imgs, sampler, dev)
    it = res.batches(0)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches * 20):
        next(it)
    sync(dev)
    out.append(("resident (preload: index gather on the device)", n_batches * 20 * batch / (time.perf_counter() - t0)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="preset (default: ssl_default = ViT-S/16 224, 2+8 crops)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 4 on CPU, 64 on GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 2 on CPU, 10 on GPU)")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--workers", type=int, default=2, help="loader workers for the data-pipeline table")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = D.resolve_device(a.device)
    gpu = dev.type == "cuda"
    batch = a.batch or (64 if gpu else 4)
    steps = a.steps or (10 if gpu else 2)
    dtype = a.dtype or ("bf16" if gpu else "fp32")
    cfg = load_config(a.config, [f"train.batch_size_per_gpu={batch}", f"train.dtype={dtype}", *a.overrides])
    info = D.DistInfo(device=dev)
    timer = StepTimer(dev, enabled=False)
    trainer = Trainer(cfg, info, timer)
    trainer.set_schedules(10**6, 1000)
    vit = trainer.vit_config
    g, l, n_l = (int(cfg["crops"][k]) for k in ("global_crops_size", "local_crops_size", "local_crops_number"))
    imgs = torch.randint(0, 256, (batch, 1, g, g), dtype=torch.uint8, device=dev)

    flops = step_flops(trainer, imgs)  # also the warm-up step
    trainer.train_step(1, imgs)
    sync(dev)
    timer.enabled = True
    t0 = time.perf_counter()
    for s in range(steps):
        trainer.train_step(2 + s, imgs)
    sync(dev)
    wall = (time.perf_counter() - t0) / steps
    timer.enabled = False
    # Untimed-sections reference: the same steps without synchronising sections (sync costs on GPU).
    t0 = time.perf_counter()
    for s in range(steps):
        trainer.train_step(100 + s, imgs)
    sync(dev)
    step_s = (time.perf_counter() - t0) / steps

    peak_dtype = torch.float32 if not gpu or dtype == "fp32" else torch.bfloat16
    peak = gemm_peak(dev, peak_dtype)
    n_params = sum(p.numel() for p in trainer.meta.student.backbone.parameters())
    print(f"device {dev} ({torch.get_num_threads()} threads)" if not gpu else f"device {torch.cuda.get_device_name(dev)}")
    print(f"model  {cfg['student']['arch']} {n_params / 1e6:.1f}M params, patch {vit.patch_size}, "
          f"{n_l} local crops, {cfg['dino']['head_n_prototypes']} prototypes, {dtype}")
    print(f"crops  2 x {g} px ({tokens(g, vit.patch_size, vit.num_register_tokens)} tokens) + {n_l} x {l} px "
          f"({tokens(l, vit.patch_size, vit.num_register_tokens)} tokens), run as two batches")
    tg, tl = tokens(g, vit.patch_size, vit.num_register_tokens), tokens(l, vit.patch_size, vit.num_register_tokens)
    padded = (2 * tg + n_l * tg) / (2 * tg + n_l * tl)
    print(f"       (one padded batch would push {padded:.2f}x the student tokens through every block)")
    print(f"\nstep   {step_s * 1000:.0f} ms for {batch} images -> {batch / step_s:.1f} images/s")
    print(f"FLOPs  {flops / 1e9:.1f} GFLOP/step ({flops / batch / 1e9:.2f} per image) -> {flops / step_s / 1e12:.3f} TFLOP/s")
    print(f"GEMM   {peak / 1e12:.3f} TFLOP/s measured peak ({peak_dtype}) -> model FLOP utilisation "
          f"{100 * flops / step_s / peak:.1f}%")
    summ = timer.summary()
    tot = sum(summ.values())
    print(f"\nwhere a step goes (sections synchronised, {wall * 1000:.0f} ms/step):")
    for k, v in sorted(summ.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<14} {v * 1000:9.1f} ms  {100 * v / tot:5.1f}%")
    rows = data_paths(dev, cfg, batch, a.workers, 3)
    if rows:
        print(f"\ndata pipelines alone ({g} px, batch {batch}; the model consumes {batch / step_s:.1f} images/s):")
        for name, ips in rows:
            print(f"  {name:<52} {ips:10.1f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
