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
                                      "is read from the bytes, not the name), or a Hugging Face Hub id: "
                                      "hf://OWNER/NAME[@REVISION][/FILE], chexfound-vitl16 (the official weights)")
    g.add_argument("--head", help="head file (ours in safetensors, or the released glori.pth: "
                                  "chexfound.adapt.load_head), or hf://OWNER/NAME[@REVISION]/FILE")
    g.add_argument("--adapter", help="a LoRA / BitFit adapter (`adapt --finetune lora|bitfit` writes "
                                     "<name>.adapter.safetensors), merged onto --backbone, which must be its base")
    g.add_argument("--model", help="instead of --backbone/--head: one bundle from `chexfound export --format "
                                   "safetensors` (a file or an hf:// id)")
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
        if args.backbone or args.head or getattr(args, "adapter", None):
            raise ConfigError(None, "give either --model or --backbone and --head (and --adapter), not both")
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
    if args.arch or args.num_heads or args.head_dim or getattr(args, "adapter", None):
        from chexfound.models import create_backbone

        backbone = create_backbone(args.backbone, config=args.arch, num_heads=args.num_heads, head_dim=args.head_dim)
    if getattr(args, "adapter", None):
        from chexfound.adapt.adapter import apply_adapter, load_adapter

        backbone = apply_adapter(backbone, load_adapter(args.adapter))
    p = Predictor(backbone, args.head, device=args.device, precision=args.precision, strict=args.strict,
                  allow_slow_precision=args.allow_slow_precision,
                  allow_backbone_mismatch=args.allow_backbone_mismatch, compile=getattr(args, "compile", False))
    if backbone is not args.backbone:  # built here: say which file (for an hf:// id, the one in the hub cache)
        from chexfound.models.hub import is_hub_id

        p.backbone_path = backbone.info.source if is_hub_id(args.backbone) else str(args.backbone)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="findings and heatmaps for chest X-rays (files, folders, a manifest)",
        description="Per-finding probabilities for each image -> CSV (path + one column per finding) or JSON "
                    "(probabilities and positive calls at the head's thresholds). Batched, resumable with the "
                    "same --out; unreadable files are listed in <out>.skipped.csv and skipped. Exit status: 0 when "
                    "--out holds predictions; 1 when no input at all could be read (every file unreadable, or no "
                    "image in the folders given), or, with --strict, when any was skipped; 2 for a usage or model "
                    "error.")
    p.add_argument("inputs", nargs="*", help="image files (DICOM, PNG, JPEG) and/or folders (searched recursively)")
    p.add_argument("--manifest", help="a CSV/Parquet manifest whose `path` column lists images")
    p.add_argument("--split", help="with --manifest: only its rows of this split (e.g. test), as `evaluate --split`")
    add_model_args(p)
    p.add_argument("--out", default="predictions.csv",
                   help="preds.csv or preds.json (default predictions.csv); a folder gets predictions.csv inside")
    p.add_argument("--heatmaps", metavar="DIR",
                   help="write heatmap overlays (PNG) per image and finding here: GLoRI attention, a linear avgpool "
                        "head's patch contributions, else the last block's CLS attention (the title says which)")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="heatmaps for the K most probable findings (default: the findings called positive)")
    p.add_argument("--dicom-out", metavar="DIR",
                   help="for each DICOM input, a DICOM Comprehensive SR of the findings (TID 1500) and its heatmaps "
                        "(the --heatmaps selection) as Secondary Captures, in new series of the image's study, "
                        "one folder per input (PNG/JPEG inputs get none: no study to attach to)")
    p.add_argument("--fhir-out", metavar="DIR",
                   help="for each input, a FHIR R5 Bundle: DiagnosticReport + one Observation per finding + the "
                        "model as Device (needs the fhir extra)")
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
    from chexfound.serve.report_outputs import ReportOutputs
    from chexfound.serve.results import PredictionStore

    if not args.inputs and not args.manifest:
        raise ConfigError(None, "give image files, folders or --manifest")
    if args.split and not args.manifest:
        raise ConfigError(None, "--split selects rows of --manifest: give --manifest too")
    if args.batch_size < 1:
        raise ConfigError(None, "--batch-size must be >= 1")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(None, "--top-k must be >= 1")
    out = resolve_out(args.out)
    predictor = load_predictor(args)
    heat_dir = Path(args.heatmaps) if args.heatmaps else None
    reports = ReportOutputs.open(predictor, args.dicom_out, args.fhir_out)
    if heat_dir is not None and not predictor.has_heatmaps:
        raise ChexfoundError(f"--heatmaps: the head ({predictor.head_type}) has no heatmaps")

    paths = collect_inputs(args.inputs, args.manifest, args.split)
    info = predictor.info()
    identity = {"backbone_sha256": predictor.backbone_sha256, "head_sha256": info["head"]["file_sha256"],
                "findings": predictor.findings, "transform": info["transform"]}
    store = PredictionStore(out, predictor.findings, predictor.thresholds, predictor.task, identity, heat_dir,
                            predictor.threshold_rules, predictor.reliability, heatmap_kind=predictor.heatmap_kind)
    store.load()
    _say_uninformative(predictor, store)
    if not args.quiet and predictor.task in ("multilabel", "binary"):
        # What a positive call means: the rule behind each threshold (per finding in the JSON and run.json).
        rules = [r["rule"] for r in predictor.threshold_rules]
        counts = ", ".join(f"{rules.count(r)} by {r}" for r in dict.fromkeys(rules))
        print(f"thresholds of {len(rules)} findings: {counts} (chexfound.stats.thresholds; per finding in "
              f"{store.run_file.name})", file=sys.stderr)
    reports.prepare(paths)
    todo = [p for p in paths if not store.done(p) or reports.wants(p)]
    settings = {"inputs": [str(i) for i in args.inputs], "manifest": args.manifest, "out": str(out),
                "heatmaps": args.heatmaps, "top_k": args.top_k, "batch_size": args.batch_size,
                "dicom_out": args.dicom_out, "fhir_out": args.fhir_out,
                "device": str(predictor.device), "precision": predictor.precision, "started": time.strftime("%FT%T%z")}
    store.start(settings)
    if store.resumed:
        log.info("%s: %d images already done, %d to go", out, len(paths) - len(todo), len(todo))

    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(todo), unit="img", desc="predict", disable=args.quiet or not todo, file=sys.stderr)
    with logging_redirect_tqdm():
        _loop(predictor, todo, store, bar, skipped, heat_dir, args, reports)
    bar.close()
    reports.finish()

    store.finish(skipped, info, settings)
    n_new = len(todo) - len(skipped)
    print(f"{out}: {len(store.rows)} images ({n_new} new, {len(paths) - len(todo)} already done), "
          f"{len(skipped)} skipped" + (f" (listed in {store.skipped_file})" if skipped else ""), file=sys.stderr)
    if not store.rows:  # not one image read (now or in an earlier run): a failure, strict or not
        print(f"error: no image could be read from {len(paths)} input(s)", file=sys.stderr)
        return 1
    return 1 if (skipped and args.strict) else 0


def _say_uninformative(predictor: Any, store: Any) -> None:
    """Once per run: a head (or findings) that cannot tell images apart gets no calls (chexfound.stats.informative)."""
    rel = predictor.reliability
    if rel.head_informative is False:
        log.warning("this head is uninformative (%s): its probabilities are written, but no finding is called "
                    "positive or negative", rel.head_reason)
    elif rel.uninformative_findings:
        names = [predictor.findings[i] for i in rel.uninformative_findings]
        log.warning("%d finding(s) are uninformative for this head and get no call: %s", len(names), ", ".join(names))
    if store.no_call:
        log.info("no call for: %s (the no_call column; per finding in %s)", ", ".join(store.no_call),
                 store.run_file.name)


def _heatmap_choice(pred: Any, top_k: int | None) -> list[int]:
    """The findings that get heatmaps: the K most probable with --top-k, else those called positive."""
    import numpy as np

    if top_k:
        return pred.ranked(top_k)
    pos = pred.positives()
    return [] if pos is None else np.flatnonzero(pos).tolist()


def _loop(predictor: Any, todo: list[Path], store: Any, bar: Any, skipped: list[tuple[str, str]],
          heat_dir: Path | None, args: argparse.Namespace, reports: Any) -> None:
    from chexfound.serve.overlay import save_overlay_files
    from chexfound.serve.results import heatmap_folder

    maps_needed = heat_dir is not None or reports.dicom is not None
    for preds in predictor.iter_batches(todo, batch_size=args.batch_size, workers=args.workers,
                                        keep_attention=maps_needed, keep_view=maps_needed):
        for pred in preds:
            if not pred.ok:
                reason = str(pred.error).removeprefix(f"{pred.path}: ")
                skipped.append((str(pred.path), reason))
                log.warning("skipped %s: %s", pred.path, reason)
                continue
            for w in pred.image_meta.get("warnings", []):  # e.g. a photometric header the pixels contradict
                log.warning("%s: %s", pred.path, w)
            which = _heatmap_choice(pred, args.top_k)
            if heat_dir is not None and pred.attention is not None and pred.view is not None and which:
                save_overlay_files(pred.view, pred.attention, pred.probabilities, pred.findings, which,
                                   heat_dir / heatmap_folder(str(pred.path)), Path(str(pred.path)).stem,
                                   kind=predictor.heatmap_kind)
            reports.write(pred, which)
        # Heatmaps and reports first, then the rows: a row on disk means its image is completely done.
        store.append(preds)
        bar.update(len(preds))
