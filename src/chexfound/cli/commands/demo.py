"""`chexfound demo`: the whole pipeline on real chest X-rays, on a CPU, in minutes."""

from __future__ import annotations

import argparse

from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="pretrain, adapt, evaluate and explain on real CXRs (minutes on a CPU)",
        description="Pretrains a small ViT (or uses the shipped checkpoint in weights/, with a short pretraining "
        "run as a pipeline check), caches features, trains GLoRI and linear heads on NIH-14 and a linear head on "
        "Kermany, compares with a random-init backbone and a raw-pixel baseline with patient-level CIs, draws a "
        "label-efficiency curve and scores GLoRI attention against NIH boxes. Rerun to resume.",
    )
    p.add_argument("--data", type=Path, default=None,
                   help="the shared data folder with kermany/ and nih14/ (default: $CHEXFOUND_DATA, else "
                        "../shared/data beside the checkout)")
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--quick", action="store_true", help="smoke-test mode (~3 min): subsets, short pretraining")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--preset", default="demo_tiny", help="pretraining preset (chexfound pretrain --list-presets)")
    p.add_argument("--pretrain-budget", type=float, default=None, help="pretraining wall-clock budget in seconds")
    p.add_argument("--weights", default=None,
                   help="use this pretrained backbone instead of weights/ (a file or an hf:// id)")
    p.add_argument("--no-shipped", action="store_true", help="ignore weights/: the pretraining run is the backbone")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from chexfound.demo.pipeline import DemoConfig, run_demo
    from chexfound.runio import data_root

    data = args.data or data_root()
    cfg = DemoConfig(data=data.resolve(), out=args.out, quick=args.quick, seed=args.seed, device=args.device,
                     preset=args.preset, pretrain_budget_s=args.pretrain_budget, weights=args.weights,
                     use_shipped=not args.no_shipped, n_boot=args.n_boot)
    run_demo(cfg)
    return 0
