"""Pretraining step throughput: images/s, GFLOP/image and % of this device's measured matmul peak (bf16 and
fp32, measured in the same process), where a step's time goes, host syncs per step, and the ratio of the
step to the old (reference) step and to the compiled step, measured in the same process.

    python bench/pretrain.py                                   # ViT-S/16 2 x 224 + 8 x 96 (the GPU proof's step), CPU
    python bench/pretrain.py --config demo_tiny --batch 64 --threads 1
    python bench/pretrain.py --device cuda --config proof_vits16_224 --config chexfound_vitl16_512 \\
        --reference --compile --json gpu_pretrain.json         # the GPU session's one call (see docs/pretraining.md)
    python bench/pretrain.py --profile runs/prof               # torch.profiler: host overhead of the step
    python bench/pretrain.py --smoke --json /tmp/p.json         # seconds: a tiny recipe (checks the code paths)

`--config` takes a preset (repeatable: one table per preset), `--arch` any backbone of the registry
(student.arch), trailing key=value pairs override the recipe. Defaults: batch = the preset's on a GPU, 4 on
the CPU; bf16 on a GPU, fp32 on the CPU. FLOPs of a step (teacher forward + student forward and backward,
heads included) are counted by torch.utils.flop_counter on one eager step. Images are synthetic uint8
already on the device (the resident pipeline), so the data side costs only the on-device multi-crop.
Variants, timed in interleaved rounds so that load changes on a shared machine hit them alike:
  step       this code (`Trainer`): device masks, no host sync, fused AdamW, foreach EMA
  reference  `Trainer(reference=True)`: host masks on a thread + copy, a finite-check sync per step,
             the EMA lists rebuilt per step, AdamW as before (fused on CUDA only), the blur's subset syncs
  compiled   the step with train.compile (blocks and heads; --compile MODE picks the torch.compile mode)
Runs from a source tree (PYTHONPATH=src or from the repository root) with torch, numpy and PyYAML.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _timing import Stopwatch, best_seconds, smoke_mode, sync  # noqa: E402

from chexfound.ssl import distributed as D  # noqa: E402
from chexfound.ssl.config import load_config  # noqa: E402
from chexfound.ssl.timing import StepTimer, SyncCounter  # noqa: E402
from chexfound.ssl.trainer import Trainer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_peak(dev: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """FLOP/s of a square matmul in `dtype` (the best of a few rounds)."""
    n = n or (8192 if dev.type == "cuda" else 1024)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, iters=5, dev=dev, calls=10 if dev.type == "cuda" else 3)


# The smoke recipe: the tiny test backbone, small heads and crops (seconds per step on a CPU).
SMOKE = ["student.arch=tiny_vit", "dino.head_n_prototypes=64", "dino.head_hidden_dim=32",
         "dino.head_bottleneck_dim=16", "ibot.head_n_prototypes=48", "ibot.head_hidden_dim=32",
         "ibot.head_bottleneck_dim=16", "ibot.separate_head=true", "crops.global_crops_size=32",
         "crops.local_crops_size=16", "crops.local_crops_number=2"]


def tokens(size: int, patch: int, regs: int) -> int:
    return 1 + regs + (size // patch) ** 2


class Variant:
    """One way of running the step, with its own trainer (same seed: same initial weights)."""

    def __init__(self, name: str, cfg: dict[str, Any], dev: torch.device, reference: bool = False) -> None:
        self.name = name
        self.timer = StepTimer(dev, enabled=False)
        self.trainer = Trainer(cfg, D.DistInfo(device=dev), self.timer, reference=reference)
        self.trainer.set_schedules(10**6, 1000)
        self.step = 0
        self.times: list[float] = []
        self.warmup_s = 0.0

    def run(self, images: torch.Tensor, n: int) -> float:
        """Seconds per step over n steps (nothing synchronised inside; one sync at the end)."""
        dev = images.device
        with Stopwatch(dev) as sw:  # nothing synchronised inside; one sync at each end
            for _ in range(n):
                self.trainer.train_step(self.step, images)
                self.step += 1
        return sw.seconds / n

    def sections(self, images: torch.Tensor, n: int) -> tuple[dict[str, float], float]:
        self.timer.reset()
        self.timer.enabled = True
        wall = self.run(images, n)
        self.timer.enabled = False
        return self.timer.summary(), wall

    def syncs(self, images: torch.Tensor) -> tuple[int, int | None]:
        """(syncing operators per step, CUDA syncs per step reported by the sync debug mode or None)."""
        dev = images.device
        with SyncCounter() as sc:
            self.trainer.train_step(self.step, images)
        self.step += 1
        cuda_syncs = None
        if dev.type == "cuda":
            sync(dev)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    self.trainer.train_step(self.step, images)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            self.step += 1
            cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
        return sc.total, cuda_syncs


def count_flops(v: Variant, images: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        v.trainer.train_step(v.step, images)
    v.step += 1
    return int(fc.get_total_flops())


def profile_host(v: Variant, images: torch.Tensor, out: Path, n: int = 2) -> dict[str, Any]:
    """torch.profiler over n steps: the top operators by self CPU time, a Chrome trace, and how much of the
    wall time no operator accounts for (Python and framework overhead on the host)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if images.device.type == "cuda" else [])
    out.mkdir(parents=True, exist_ok=True)
    with Stopwatch(images.device) as sw, profile(activities=acts, record_shapes=False) as prof:
        v.run(images, n)
    wall = sw.seconds
    ka = prof.key_averages()
    prof.export_chrome_trace(str(out / f"trace_{v.name}.json"))
    table = ka.table(sort_by="self_cpu_time_total", row_limit=25)
    (out / f"ops_{v.name}.txt").write_text(table)
    ops_s = sum(e.self_cpu_time_total for e in ka) / 1e6
    n_ops = sum(e.count for e in ka)
    return {"wall_s_per_step": wall / n, "op_self_cpu_s_per_step": ops_s / n, "ops_per_step": n_ops / n,
            "top": [(e.key, e.self_cpu_time_total / 1e3 / n, e.count // n) for e in
                    sorted(ka, key=lambda e: -e.self_cpu_time_total)[:12]]}


def data_paths(dev: torch.device, size: int, batch: int, workers: int, n_batches: int = 3) -> list[tuple[str, float]]:
    """images/s of each data pipeline alone (no model): loader (decode each step) vs resident gather."""
    import os

    from chexfound.ssl.data import LoaderSource, PreloadedSource, Skipped, corpus_paths
    from chexfound.ssl.sampler import ShardedStreamSampler

    data = Path(os.environ.get("CHEXFOUND_DATA", ROOT.parent / "shared" / "data")) / "kermany"
    if not data.is_dir():
        print(f"   (no {data}: data pipelines not measured)")
        return []
    paths = corpus_paths([{"path": str(data)}], "train")[: batch * (n_batches + 2) * 2]
    sampler = ShardedStreamSampler(len(paths), batch, seed=0)
    out = []
    it = LoaderSource(paths, size, sampler, dev, workers, Skipped()).batches(0)
    next(it)  # worker start-up
    with Stopwatch(dev) as sw:
        for _ in range(n_batches):
            next(it)
    out.append((f"loader ({workers} workers, decode + resize per step)", n_batches * batch / sw.seconds))
    imgs = torch.randint(0, 256, (len(paths), 1, size, size), dtype=torch.uint8)
    it = PreloadedSource(imgs, sampler, dev).batches(0)
    next(it)
    with Stopwatch(dev) as sw:
        for _ in range(n_batches * 20):
            next(it)
    out.append(("resident (preload: index gather on the device)", n_batches * 20 * batch / sw.seconds))
    return out


def bench_config(name: str, a: argparse.Namespace, dev: torch.device, peaks: dict[str, float]) -> dict[str, Any]:
    gpu = dev.type == "cuda"
    probe_cfg = load_config(name, [])
    batch = a.batch or (int(probe_cfg["train"]["batch_size_per_gpu"]) if gpu else 4)
    dtype = a.dtype or ("bf16" if gpu else "fp32")
    over = [f"train.batch_size_per_gpu={batch}", f"train.dtype={dtype}", "train.compile=false",
            "train.distributed=ddp", *([f"student.arch={a.arch}"] if a.arch else []), *a.overrides]
    cfg = load_config(name, over)
    g, lsz, n_l = (int(cfg["crops"][k]) for k in ("global_crops_size", "local_crops_size", "local_crops_number"))
    images = torch.randint(0, 256, (batch, 1, g, g), dtype=torch.uint8, device=dev)

    variants = [Variant("step", cfg, dev)]
    if a.reference:
        variants.append(Variant("reference", cfg, dev, reference=True))
    flops = count_flops(variants[0], images)  # eager, before anything is compiled
    if a.compile:
        mode = True if a.compile == "default" else a.compile
        variants.append(Variant("compiled", {**cfg, "train": {**cfg["train"], "compile": mode}}, dev))
    for v in variants:  # warm-up (the compiled variant compiles here)
        with Stopwatch(dev) as sw:
            v.run(images, a.warmup)
        v.warmup_s = sw.seconds
    for _ in range(a.rounds):  # interleaved timing rounds
        for v in variants:
            v.times.append(v.run(images, a.steps))

    tr = variants[0].trainer
    vit = tr.vit_config
    n_params = sum(p.numel() for p in tr.meta.student.backbone.parameters())
    tg, tl = tokens(g, vit.patch_size, vit.num_register_tokens), tokens(lsz, vit.patch_size, vit.num_register_tokens)
    peak = peaks[dtype]
    print(f"\n== {name}: {cfg['student']['arch']} {n_params / 1e6:.1f}M params, {dtype}, batch {batch}, "
          f"2 x {g} px ({tg} tokens) + {n_l} x {lsz} px ({tl} tokens), "
          f"{cfg['dino']['head_n_prototypes']} prototypes, iBOT {'on' if tr.meta.ibot_enabled else 'off'}")
    print(f"   FLOPs {flops / 1e9:.1f} GFLOP/step = {flops / batch / 1e9:.2f} GFLOP/image")
    res: dict[str, Any] = {"config": name, "arch": cfg["student"]["arch"], "dtype": dtype, "batch": batch,
                           "gflop_per_image": flops / batch / 1e9, "variants": {}}
    print(f"   {'variant':<10} {'ms/step':>9} {'images/s':>10} {'TFLOP/s':>9} {'% bf16 pk':>9} {'% fp32 pk':>9}"
          f" {'vs step':>8} {'warm-up s':>9}")
    base = None
    for v in variants:
        step_s = min(v.times)  # the best round: the least disturbed by other load
        ips = batch / step_s
        base = base or ips
        tflops = flops / step_s / 1e12
        row = {"ms_per_step": step_s * 1e3, "images_per_s": ips, "tflop_per_s": tflops,
               "pct_bf16_peak": 100 * flops / step_s / peaks["bf16"], "pct_fp32_peak": 100 * flops / step_s / peaks["fp32"],
               "ratio_vs_step": ips / base, "warmup_s": v.warmup_s, "rounds_ms": [t * 1e3 for t in v.times]}
        res["variants"][v.name] = row
        print(f"   {v.name:<10} {row['ms_per_step']:9.1f} {ips:10.1f} {tflops:9.3f} {row['pct_bf16_peak']:8.1f}%"
              f" {row['pct_fp32_peak']:8.1f}% {ips / base:7.2f}x {v.warmup_s:9.1f}")
    res["pct_of_training_dtype_peak"] = {k: 100 * flops / (r["ms_per_step"] / 1e3) / peak for k, r in res["variants"].items()}
    if "reference" in res["variants"]:
        r = res["variants"]["step"]["images_per_s"] / res["variants"]["reference"]["images_per_s"]
        res["step_vs_reference"] = r
        print(f"   step / reference: {r:.2f}x images/s")

    # host syncs per step
    print("   host syncs per step (syncing operators" + (", CUDA sync debug mode)" if gpu else ")"))
    res["syncs"] = {}
    for v in variants:
        if v.name == "compiled":
            continue
        ops, cuda_syncs = v.syncs(images)
        res["syncs"][v.name] = {"operators": ops, "cuda": cuda_syncs}
        print(f"     {v.name:<10} {ops:4d}" + (f"   {cuda_syncs:4d}" if cuda_syncs is not None else ""))

    # where the time goes (synchronised sections)
    res["sections"] = {}
    for v in variants:
        summ, wall = v.sections(images, a.steps)
        tot = sum(summ.values())
        res["sections"][v.name] = {"wall_ms": wall * 1e3, **{k: s * 1e3 for k, s in summ.items()}}
        parts = ", ".join(f"{k} {100 * s / tot:.0f}%" for k, s in sorted(summ.items(), key=lambda kv: -kv[1]) if s / tot >= 0.005)
        print(f"   where a step goes, {v.name} (sections synchronised, {wall * 1e3:.0f} ms/step): {parts}")

    if a.profile:
        res["profile"] = {}
        for v in variants:
            p = profile_host(v, images, Path(a.profile) / name)
            res["profile"][v.name] = p
            other = p["wall_s_per_step"] - p["op_self_cpu_s_per_step"]
            print(f"   profile {v.name}: {p['wall_s_per_step'] * 1e3:.0f} ms/step, {p['ops_per_step']:.0f} operator calls, "
                  f"operators' self CPU time {p['op_self_cpu_s_per_step'] * 1e3:.0f} ms, "
                  f"unaccounted (Python/framework) {other * 1e3:.0f} ms ({100 * other / p['wall_s_per_step']:.1f}%)")
            for key, ms, cnt in p["top"][:6]:
                print(f"       {key:<40} {ms:9.1f} ms  x{cnt}")
    if a.data_paths:
        rows = data_paths(dev, g, batch, a.workers)
        res["data_paths"] = dict((k, ips) for k, ips in rows)
        for k, ips in rows:
            print(f"   data alone: {k:<50} {ips:10.1f} images/s")
    for v in variants:
        del v.trainer
    if a.compile:
        import torch._dynamo as dynamo

        dynamo.reset()  # drop the compiled graphs (and the modules they hold) before the next preset
    if gpu:
        torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=None,
                    help="preset (repeatable; default proof_vits16_224: ViT-S/16, 2 x 224 + 8 x 96 crops)")
    ap.add_argument("--arch", default=None, help="backbone registry name (student.arch) instead of the preset's")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: the preset's on GPU, 4 on CPU)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="steps per timing round (default 2 on CPU, 10 on GPU)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the best is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compiles there)")
    ap.add_argument("--reference", action="store_true", help="also time the old step (Trainer(reference=True))")
    ap.add_argument("--compile", nargs="?", const="default", default=None,
                    help="also time the compiled step (optionally a torch.compile mode, e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--profile", default=None, help="folder for torch.profiler traces/tables of each variant")
    ap.add_argument("--data-paths", action="store_true", help="also time the data pipelines alone (Kermany images)")
    ap.add_argument("--workers", type=int, default=2, help="loader workers for --data-paths")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds on a CPU: demo_tiny with the tiny test backbone, batch 4, one step per round, the "
                         "reference step and a profile (checks every code path; timings mean nothing)")
    ap.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    a = ap.parse_args()
    if a.smoke:
        smoke_mode()
        a.config = a.config or ["demo_tiny"]
        a.batch, a.steps, a.rounds, a.warmup, a.threads = a.batch or 4, 1, 1, 1, a.threads or 1
        a.reference = True
        a.overrides = [*SMOKE, *a.overrides]
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = D.resolve_device(a.device)
    gpu = dev.type == "cuda"
    a.steps = a.steps or (10 if gpu else 2)
    configs = a.config or ["proof_vits16_224"]
    peaks = {k: gemm_peak(dev, t, n=256 if a.smoke else None) for k, t in DTYPES.items()}
    name = torch.cuda.get_device_name(dev) if gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, torch {torch.__version__}")
    print(f"matmul peak measured here: bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s, fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s")
    out: dict[str, Any] = {"device": name, "torch": torch.__version__, "peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
                           "date": time.strftime("%Y-%m-%d"), "results": []}
    for c in configs:
        out["results"].append(bench_config(c, a, dev, peaks))
    if a.json:
        from chexfound.runio import atomic_write_json

        atomic_write_json(a.json, out)
        print(f"\nfigures written to {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
