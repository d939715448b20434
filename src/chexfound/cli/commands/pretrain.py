"""`chexfound pretrain`: DINO + iBOT + KoLeo self-supervised pretraining (one process or under torchrun).

  chexfound pretrain --config vits16_cpu_smoke --data ../shared/data/kermany --out runs/smoke
  chexfound pretrain --config demo_tiny --data DIR --out runs/demo --set optim.base_lr=2e-3 --set train.seed=1
  torchrun --nproc_per_node=8 -m chexfound pretrain --config chexfound_vitl16_512 --data manifest.csv --out runs/l16
  python -m chexfound pretrain --config proof_vits16_224 --proof-out DIR     # the GPU proof (make gpu-proof OUT=DIR)
  chexfound pretrain --config continue_vitl16_512 --init-from teacher_checkpoint.pth --data DIR --out runs/cont

A rerun with the same --out resumes from the last checkpoint. See docs/pretraining.md.
"""

from __future__ import annotations

import argparse
from typing import Any

from chexfound.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining of a ViT backbone (DINOv2/CheXFound recipe)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None,
                   help="preset name (see --list-presets) or a YAML file; layered over ssl_default.yaml")
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="a folder of images, a folder with labels.csv/manifest.csv, or a manifest file; "
                        "repeat for several sources (replaces data.sources)")
    p.add_argument("--out", default=None, help="run folder (created; a rerun resumes)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    p.add_argument("--batch-size", type=int, default=None, help="images per process (train.batch_size_per_gpu)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (data.num_workers)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default=None, help="train.dtype")
    p.add_argument("--seed", type=int, default=None, help="train.seed")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="fit the run to this wall-clock budget (train.time_budget_s)")
    p.add_argument("--init-from", default=None, metavar="SOURCE",
                   help="start student and teacher from these weights (train.init_from): the release's "
                        "teacher_checkpoint.pth (its DINO/iBOT heads too), a backbone file or id create_backbone "
                        "reads (fresh heads), or one of our run folders / ckpt_*.pt; see the preset "
                        "continue_vitl16_512")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--proof-out", default=None, metavar="DIR",
                   help="the GPU proof: after the run, gather the bf16 teacher shards, one archive of the run's logs "
                        "and verdict.json (at most 8 files of <= 16 MiB) into DIR and print the verdict; --out "
                        "defaults to a temporary folder")
    p.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.base_lr=1e-3 (repeatable; values are YAML)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="the same overrides without --set (kept for older scripts)")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    from chexfound.ssl.config import load_config, set_key, validate

    cfg = load_config(args.config, [*args.overrides, *getattr(args, "set", [])])
    for key, val in (("train.batch_size_per_gpu", args.batch_size), ("data.num_workers", args.workers),
                     ("train.dtype", args.dtype), ("train.seed", args.seed), ("train.time_budget_s", args.time_budget),
                     ("train.init_from", getattr(args, "init_from", None))):
        if val is not None:
            set_key(cfg, key, val)
    if args.data:
        cfg["data"]["sources"] = [{"path": d} for d in args.data]
    validate(cfg)
    return cfg


def run(args: argparse.Namespace) -> int:
    from chexfound.ssl.config import dump_config, list_presets

    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    cfg = build_config(args)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.proof_out:
        return _proof(args, cfg)
    if not args.out:
        raise ConfigError(None, "--out DIR is required")
    from chexfound.ssl import distributed as D
    from chexfound.ssl.train import pretrain

    try:
        pretrain(cfg, args.out, device=args.device, quiet=args.quiet)
    finally:
        D.destroy()
    return 0


def _proof(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    """Pretrain, then gather what a remote machine can hand back and print the verdict (chexfound.ssl.gpu_proof)."""
    from chexfound.ssl.gpu_proof import check_environment, gather, verdict, verdict_text

    for note in check_environment():
        print(f"note: {note}")
    if not cfg["checkpoint"].get("export_bf16_shard_mib"):
        cfg["checkpoint"]["export_bf16_shard_mib"] = 16
    out = args.out
    if not out:
        import tempfile

        out = tempfile.mkdtemp(prefix="chexfound-proof-")
        print(f"run folder (checkpoints, full exports): {out}")
    from chexfound.ssl import distributed as D
    from chexfound.ssl.train import pretrain

    try:
        res = pretrain(cfg, out, device=args.device, quiet=args.quiet)
    finally:
        D.destroy()
    v = verdict(res.comparison, int(cfg["probe"]["final_random_seeds"]))
    files = gather(out, args.proof_out, v)
    print("\n" + verdict_text(v))
    print(f"\ngathered {len(files)} file(s) in {args.proof_out}: " + ", ".join(
        f"{f.name} ({f.stat().st_size / 2**20:.1f} MiB)" for f in files))
    return 0
