"""`chexfound adapt`: train disease-specific heads (GLoRI, linear, MLP) on frozen, cached backbone features."""

from __future__ import annotations

import argparse
from typing import Any

from chexfound.cli.options import DeprecatedOption, head_type_choices
from chexfound.data.uncertain import UNCERTAIN_POLICIES

EPILOG = """\
examples:
  chexfound adapt --backbone chexfound.safetensors --train train.csv --val val.csv --head glori --out runs/glori
  chexfound adapt --backbone vits16_224 --train ../shared/data/nih14/labels.csv --val-split 0.2 --head linear \\
      --epochs 10 --out runs/lin --heatmaps 4
  chexfound adapt ... --finetune lora --lrs 1e-3 --epochs 5     # end to end (no cache): full | lora | bitfit
  chexfound embed --backbone B --manifest all.csv --tokens feats/ && \
      chexfound adapt --features feats/ --train train.csv --val val.csv --head glori --out runs/g   # no backbone

The training manifest may carry a `split` column (train / val); without --val and without val rows, a
--val-split fraction of patients is held out. Reruns with the same --out (or --cache) reuse the features.
Outputs in --out (<name> = --name or the head type, so several heads can share one folder and its cache):
<name>.safetensors (best head, with thresholds, backbone sha256 and input transform; `predict` needs nothing
else), <name>.val_per_finding.csv (AUROC/AP/threshold per finding), <name>.grid.csv (every lr/wd config),
<name>.val_predictions.csv, <name>.metrics.json, <name>.config.yaml, heatmaps/<name>/*.png, metrics.jsonl
(progress log of every run), skipped.csv (unreadable images), cache/ (features; or --cache DIR);
with --finetune full also <name>.backbone.safetensors (the adapted backbone the head belongs to); with
--finetune lora|bitfit <name>.adapter.safetensors instead (only what was trained, tied to the base backbone's
SHA-256: `predict --backbone BASE --adapter A --head H`; `export --format hf --adapter A` writes it for peft),
and the merged backbone too with --save-merged (always when the base is a named, random-init architecture).
"""


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from e


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("adapt", help="train GLoRI / linear / MLP heads on frozen cached features",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("backbone and data")
    src.add_argument("--backbone", metavar="FILE|NAME",
                     help="backbone weights (any format chexfound can load; a file or an hf:// id), or a named architecture with random "
                          "weights (baselines); optional with --features, where it is checked against them")
    src.add_argument("--config", dest="backbone", action=DeprecatedOption, replacement="--backbone NAME")
    src.add_argument("--train", required=True, metavar="MANIFEST", help="training manifest (CSV/Parquet)")
    src.add_argument("--val", metavar="MANIFEST", help="validation manifest (default: split column or --val-split)")
    src.add_argument("--val-split", type=float, default=0.2, help="patient fraction held out when no val given")
    src.add_argument("--labels", type=_names, metavar="COLS", help="comma-separated label columns (default: inferred)")
    src.add_argument("--task", default="multilabel",
                     choices=["multilabel", "binary", "multiclass", "regression", "survival"],
                     help="survival takes two columns: time,event")
    src.add_argument("--uncertain", default="nan", choices=UNCERTAIN_POLICIES,
                     help="uncertain (-1) labels: ignore (nan), negative or positive")
    src.add_argument("--n-blocks", type=int, help="last n blocks of features (default min(4, depth))")
    src.add_argument("--image-size", type=int, help="input size (default: the backbone's)")
    src.add_argument("--cache", metavar="DIR", help="feature cache folder (default OUT/cache)")
    src.add_argument("--features", metavar="FILE|DIR",
                     help="train on what `chexfound embed` wrote (a token cache folder from --tokens, or a pooled "
                          "file for linear/MLP heads) instead of running the backbone; images are matched to the "
                          "manifests by path, then image_id")
    src.add_argument("--flip-tta", action="store_true", help="also cache features of the flipped image")
    src.add_argument("--flip-augment", action="store_true", help="train on random flipped features (needs --flip-tta)")

    head = p.add_argument_group("head")
    head.add_argument("--head", default="glori", choices=head_type_choices(), metavar="HEAD",
                      help="head type: glori (attends over patch tokens), linear or mlp (pooled features)")
    head.add_argument("--name", help="head file name in --out (default: the head type)")
    head.add_argument("--decoder-dim", type=int, default=768)
    head.add_argument("--num-heads", type=int, default=8, help="GLoRI attention heads")
    head.add_argument("--ffn-dim", type=int, default=2048)
    head.add_argument("--dropout", type=float, default=0.1)
    head.add_argument("--cat-cls", action="store_true", help="GLoRI: concatenate the last-n CLS tokens (global)")
    head.add_argument("--learn-queries", action="store_true", help="GLoRI: train the class queries")
    head.add_argument("--coarse", type=_ints, default=[], metavar="K,K", dest="coarse_pools",
                      help="GLoRI: add average-pooled (KxK) patch tokens beside the fine ones, e.g. 2,4,8")
    head.add_argument("--avgpool", action="store_true", help="linear/MLP: append the mean patch token")
    head.add_argument("--hidden-dim", type=int, default=1024, help="MLP hidden width")

    tr = p.add_argument_group("training")
    tr.add_argument("--lrs", type=_floats, help="learning-rate grid (default: the original's 13 values)")
    tr.add_argument("--wds", type=_floats, default=[1e-4], dest="weight_decays", help="weight-decay grid")
    tr.add_argument("--epochs", type=int, default=20)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--loss", choices=["bce", "asl", "bce+asl", "ce", "mse", "cox"],
                    help="default: bce / ce / mse / cox by task; bce+asl is the original's --focal-loss")
    tr.add_argument("--class-balance", default="none", choices=["none", "pos_weight", "effective"])
    tr.add_argument("--metric", help="selection metric (default macro_ap; r2 regression; c_index survival)")
    tr.add_argument("--patience", type=int, help="early stopping: evaluations without improvement")
    tr.add_argument("--eval-every", type=int, default=1, help="epochs between validations")
    tr.add_argument("--thresholds", default="f1", choices=["f1", "youden"], dest="threshold_method")
    tr.add_argument("--grid-chunk", type=int, help="configs per vmapped forward (lower to save memory)")
    tr.add_argument("--finetune", choices=["full", "lora", "bitfit"],
                    help="train end to end without the cache (uses the first --lrs value for the head)")
    tr.add_argument("--save-merged", action="store_true",
                    help="--finetune lora|bitfit: also write the merged backbone (<name>.backbone.safetensors) "
                         "beside the adapter")
    tr.add_argument("--backbone-lr", type=float, help="end to end: backbone lr (default 1e-5 full, else head lr)")

    o = p.add_argument_group("outputs and common options")
    o.add_argument("--out", required=True, metavar="DIR")
    o.add_argument("--heatmaps", type=int, default=0, metavar="N", help="attention overlays for N val images")
    o.add_argument("--heatmap-top-k", type=int, default=3, help="findings drawn per image (most probable)")
    o.add_argument("--device", default="auto")
    o.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="backbone precision")
    o.add_argument("--workers", type=int, default=0)
    o.add_argument("--compile", action="store_true",
                   help="torch.compile each backbone block while caching features (pays on a GPU; off on CPU)")
    o.add_argument("--no-pack", dest="pack", action="store_false",
                   help="on CPU, cache features with the plain model instead of the oneDNN packed-weight path")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--quiet", action="store_true")
    o.add_argument("--strict", action="store_true", help="exit 1 when any image was skipped")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from chexfound.adapt.pipeline import AdaptOptions, run_adapt
    from chexfound.adapt.fit import DEFAULT_LRS

    known = {f.name for f in fields(AdaptOptions)}
    kw = {k: v for k, v in vars(args).items() if k in known and v is not None}
    # End to end trains one configuration: the head lr defaults to 1e-3 there, to the 13-value grid otherwise.
    kw["lrs"] = list(args.lrs) if args.lrs else ([1e-3] if args.finetune else list(DEFAULT_LRS))
    summary = run_adapt(AdaptOptions(**kw))
    return int(summary["exit_code"])
