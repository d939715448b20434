"""`chexfound predict`: findings (and heatmaps) for files, folders or a manifest -> CSV or JSON."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from chexfound.cli.options import add_arch_options, add_precision_options
from chexfound.errors import ChexfoundError, ConfigError

log = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser, compile_option: bool = True) -> None:
    """--backbone/--head (or --model bundle), shared by predict, serve and export."""
    g = p.add_argument_group("model")
    g.add_argument("--backbone", help="backbone file (any layout chexfound.models.create_backbone reads; the kind "
                                      "is read from the bytes, not the name)")
    g.add_argument("--head", help="head file (ours in safetensors, or the released glori.pth: "
                                  "chexfound.adapt.load_head)")
    g.add_argument("--model", help="instead of --backbone/--head: one bundle from `chexfound export --format "
                                   "safetensors`")
    add_arch_options(g)
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    add_precision_options(g)
    if compile_option:
        g.add_argument("--compile", action="store_true",
                       help="torch.compile each backbone block (pays on a GPU after a one-off compile; off on CPU)")
    g.add_argument("--allow-backbone-mismatch", action="store_true",
                   help="run a head trained on another backbone (its outputs are then not meaningful; a warning "
                        "is logged and recorded in the model info). Without it such a pair is refused")
    g.add_argument("--strict", action="store_true",
                   help="refuse a backbone mismatch even with --allow-backbone-mismatch; for predict, also exit "
                        "non-zero when any input was skipped")


def load_predictor(args: argparse.Namespace) -> Any:
    from chexfound.serve.predictor import Predictor

    if args.model:
        if args.backbone or args.head:
            raise ConfigError(None, "give either --model or --backbone and --head, not both")
        if args.arch or args.num_heads or args.head_dim:
            raise ConfigError(None, "--arch/--num-heads/--head-dim describe a --backbone file; a --model bundle "
                                    "records its architecture")
        return Predictor.from_bundle(args.model, device=args.device, precision=args.precision, strict=args.strict,
                                     allow_slow_precision=args.allow_slow_precision,
                                     allow_backbone_mismatch=args.allow_backbone_mismatch,
                                     compile=getattr(args, "compile", False))
    if not (args.backbone and args.head):
        raise ConfigError(None, "--backbone and --head are required (or --model BUNDLE)")
    backbone = args.backbone
    if args.arch or args.num_heads or args.head_dim:
        from chexfound.models import create_backbone

        backbone = create_backbone(args.backbone, config=args.arch, num_heads=args.num_heads, head_dim=args.head_dim)
    p = Predictor(backbone, args.head, device=args.device, precision=args.precision, strict=args.strict,
                  allow_slow_precision=args.allow_slow_precision,
                  allow_backbone_mismatch=args.allow_backbone_mismatch, compile=getattr(args, "compile", False))
    p.backbone_path = str(args.backbone)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="findings and heatmaps for chest X-rays (files, folders, a manifest)",
        description="Per-finding probabilities for each image -> CSV (path + one column per finding) or JSON "
                    "(probabilities and positive calls at the head's thresholds). Batched, resumable with the "
                    "same --out; unreadable files are listed in <out>.skipped.csv and skipped.")
    p.add_argument("inputs", nargs="*", help="image files (DICOM, PNG, JPEG) and/or folders (searched recursively)")
    p.add_argument("--manifest", help="a CSV/Parquet manifest whose `path` column lists images")
    add_model_args(p)
    p.add_argument("--out", default="predictions.csv",
                   help="preds.csv or preds.json (default predictions.csv); a folder gets predictions.csv inside")
    p.add_argument("--heatmaps", metavar="DIR",
                   help="write heatmap overlays (PNG) per image and finding here (needs an attention head)")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="heatmaps for the K most probable findings (default: the findings called positive)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def resolve_out(out: str) -> Path:
    p = Path(out)
    if p.suffix.lower() in (".csv", ".json"):
        return p
    if p.suffix and not p.is_dir():
        raise ConfigError(p, "--out must end in .csv or .json, or be a folder")
    return p / "predictions.csv"


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from chexfound.serve.inputs import collect_inputs
    from chexfound.serve.results import PredictionStore

    if not args.inputs and not args.manifest:
        raise ConfigError(None, "give image files, folders or --manifest")
    if args.batch_size < 1:
        raise ConfigError(None, "--batch-size must be >= 1")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(None, "--top-k must be >= 1")
    out = resolve_out(args.out)
    predictor = load_predictor(args)
    heat_dir = Path(args.heatmaps) if args.heatmaps else None
    if heat_dir is not None and not predictor.has_attention:
        raise ChexfoundError(f"--heatmaps: the head ({predictor.head_type}) returns no attention maps; heatmaps need "
                             "an attention head such as GLoRI")

    paths = collect_inputs(args.inputs, args.manifest)
    info = predictor.info()
    identity = {"backbone_sha256": predictor.backbone_sha256, "head_sha256": info["head"]["file_sha256"],
                "findings": predictor.findings, "transform": info["transform"]}
    store = PredictionStore(out, predictor.findings, predictor.thresholds, predictor.task, identity, heat_dir,
                            predictor.threshold_rules)
    store.load()
    if not args.quiet and predictor.task in ("multilabel", "binary"):
        # What a positive call means: the rule behind each threshold (per finding in the JSON and run.json).
        rules = [r["rule"] for r in predictor.threshold_rules]
        counts = ", ".join(f"{rules.count(r)} by {r}" for r in dict.fromkeys(rules))
        print(f"thresholds of {len(rules)} findings: {counts} (chexfound.stats.thresholds; per finding in "
              f"{store.run_file.name})", file=sys.stderr)
    todo = [p for p in paths if not store.done(p)]
    settings = {"inputs": [str(i) for i in args.inputs], "manifest": args.manifest, "out": str(out),
                "heatmaps": args.heatmaps, "top_k": args.top_k, "batch_size": args.batch_size,
                "device": str(predictor.device), "precision": predictor.precision, "started": time.strftime("%FT%T%z")}
    store.start(settings)
    if store.resumed:
        log.info("%s: %d images already done, %d to go", out, len(paths) - len(todo), len(todo))

    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(todo), unit="img", desc="predict", disable=args.quiet or not todo, file=sys.stderr)
    with logging_redirect_tqdm():
        _loop(predictor, todo, store, bar, skipped, heat_dir, args)
    bar.close()

    store.finish(skipped, info, settings)
    n_new = len(todo) - len(skipped)
    print(f"{out}: {len(store.rows)} images ({n_new} new, {len(paths) - len(todo)} already done), "
          f"{len(skipped)} skipped" + (f" (listed in {store.skipped_file})" if skipped else ""), file=sys.stderr)
    return 1 if (skipped and args.strict) else 0


def _loop(predictor: Any, todo: list[Path], store: Any, bar: Any, skipped: list[tuple[str, str]],
          heat_dir: Path | None, args: argparse.Namespace) -> None:
    import numpy as np

    from chexfound.serve.overlay import save_overlay_files
    from chexfound.serve.results import heatmap_folder

    for preds in predictor.iter_batches(todo, batch_size=args.batch_size, workers=args.workers,
                                        keep_attention=heat_dir is not None, keep_view=heat_dir is not None):
        for pred in preds:
            if not pred.ok:
                reason = str(pred.error).removeprefix(f"{pred.path}: ")
                skipped.append((str(pred.path), reason))
                log.warning("skipped %s: %s", pred.path, reason)
            elif heat_dir is not None and pred.attention is not None and pred.view is not None:
                pos = pred.positives()
                if args.top_k:
                    which = pred.ranked(args.top_k)
                else:
                    which = [] if pos is None else np.flatnonzero(pos).tolist()
                if which:
                    save_overlay_files(pred.view, pred.attention, pred.probabilities, pred.findings, which,
                                       heat_dir / heatmap_folder(str(pred.path)), Path(str(pred.path)).stem)
        # Heatmaps first, then the rows: a row on disk means its image is completely done.
        store.append(preds)
        bar.update(len(preds))
