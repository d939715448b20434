"""`chexfound embed`: images, folders or a manifest -> the project's features, computed once:
a pooled-features file (`--out`: CLS of the last n blocks + mean patch token per image) and/or a token cache
(`--tokens DIR`: the patch tokens GLoRI trains on, plus the pooled view), from one forward pass. Both are
what `chexfound adapt --features` trains heads on without running the backbone again. Resumable (rerun the
same command), bad files skipped and listed, and under `torchrun` every rank embeds its own share of
chunks and rank 0 finishes the outputs."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from datetime import timedelta
from pathlib import Path

from chexfound.cli.options import DeprecatedOption, add_arch_options, add_precision_options
from chexfound.errors import ChexfoundError
from chexfound.runio import SKIPPED_FILE

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".pgm"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed images with a backbone into a features file and/or a token cache",
        description="Embed images (files, folders searched recursively, or a manifest) into OUT (.safetensors or "
                    ".npz): CLS token of each of the last --n-blocks blocks and the mean patch token of the last "
                    "block, with image ids and paths; with --tokens DIR also (or only) the patch tokens of those "
                    "blocks (what GLoRI heads train on). `chexfound adapt --features OUT|DIR` trains on either "
                    "without running the backbone. Rerun the same command to resume after an interruption. "
                    "Under torchrun each rank embeds its own chunks and rank 0 merges.",
    )
    p.add_argument("inputs", nargs="*", help="image files and/or folders")
    p.add_argument("--manifest", help="manifest CSV/Parquet (column path, optional image_id)")
    p.add_argument("--split", help="only the manifest rows of this split")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--backbone", metavar="FILE|NAME",
                     help="backbone weights (any format `chexfound convert` reads; a file or an hf:// id), or a named architecture with "
                          "random weights (--seed; for baselines and smoke runs)")
    src.add_argument("--config", dest="backbone", action=DeprecatedOption, replacement="--backbone NAME")
    add_arch_options(p, old_spelling="--backbone-config")
    p.add_argument("--out", help="pooled-features file: .safetensors or .npz")
    p.add_argument("--tokens", metavar="DIR",
                   help="also write a token cache folder (patch + CLS tokens of the last --n-blocks blocks, float16)")
    p.add_argument("--flip-tta", action="store_true", help="--tokens: also cache the horizontally flipped image")
    p.add_argument("--n-blocks", type=int, default=None,
                   help="CLS of the last N blocks (default 4, or all blocks of a shallower model)")
    p.add_argument("--size", type=int, default=None, help="input size (default: the backbone's)")
    p.add_argument("--mode", choices=["crop", "pad"], default="crop", help="square the image by centre crop or pad")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=256, help="images per resumable part (default 256)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    add_precision_options(p)
    p.add_argument("--feature-dtype", choices=["float32", "float16"], default="float32", help="stored dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of a named --backbone")
    p.add_argument("--no-pack", action="store_true",
                   help="on CPU, run the plain model instead of the oneDNN packed-weight fast path")
    add_speed_options(p, cuda_graphs=True)
    p.add_argument("--keep-parts", action="store_true", help="keep OUT.parts/ after merging")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any image was skipped")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def add_speed_options(p: argparse.ArgumentParser, cuda_graphs: bool = False) -> None:
    """--compile (and --cuda-graphs, --sdpa): the GPU fast paths of `chexfound.models.inference`."""
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (static shapes): pays on a GPU; off by default "
                        "(on a CPU it compiles for minutes and is no faster than the packed path)")
    if cuda_graphs:
        p.add_argument("--cuda-graphs", action="store_true",
                       help="CUDA: replay the forward from a graph captured at the fixed batch shape")
        p.add_argument("--sdpa", default="auto", choices=["auto", "flash", "cudnn", "efficient", "math"],
                       help="attention backend (default: PyTorch's choice)")


def list_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """Files as given; folders searched recursively for image files (id = path relative to the folder)."""
    paths: list[str] = []
    ids: list[str] = []
    for item in inputs:
        q = Path(item)
        if q.is_dir():
            found = sorted(f for f in q.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ChexfoundError(f"{q}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            paths += [str(f) for f in found]
            ids += [f.relative_to(q).as_posix() for f in found]
        else:
            # A missing file is not fatal: like any unreadable image it is skipped and listed.
            paths.append(str(q))
            ids.append(item)
    return paths, ids


def manifest_inputs(manifest: str, split: str | None) -> tuple[list[str], list[str]]:
    from chexfound.data.manifest import read_manifest

    m = read_manifest(manifest, labels=[])
    if split:
        m = m.split(split)
    paths = [str(p) for p in m.paths()]
    col = "image_id" if "image_id" in m.df.columns else "path"
    return paths, m.df[col].astype(str).tolist()


def run(args: argparse.Namespace) -> int:
    import torch

    from chexfound.models import create_backbone
    from chexfound.models.embedder import EmbedSettings, run_engine
    from chexfound.models.pooled_file import FEATURE_SUFFIXES, PooledFileWriter
    from chexfound.runio import distributed as D

    if not args.out and not args.tokens:
        raise ChexfoundError("give --out FILE (pooled features) and/or --tokens DIR (token cache)")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix not in FEATURE_SUFFIXES:
        raise ChexfoundError(f"{out}: --out must end with {' or '.join(FEATURE_SUFFIXES)}")
    if args.flip_tta and not args.tokens:
        raise ChexfoundError("--flip-tta applies to the token cache: add --tokens DIR")
    if bool(args.inputs) == bool(args.manifest):
        raise ChexfoundError("give image files/folders or --manifest (one of them)")
    if args.batch_size < 1 or args.chunk_size < 1:
        raise ChexfoundError("--batch-size and --chunk-size must be positive")
    # Long timeout: ranks wait at the final barrier until the slowest shard is done.
    info = D.init_distributed(args.device, timeout_s=timedelta(days=7).total_seconds())
    device, world, rank = info.device, info.world_size, info.rank
    try:
        from chexfound.models.precision import check_precision

        check_precision(args.precision, device, allow_slow=args.allow_slow_precision)
        paths, ids = manifest_inputs(args.manifest, args.split) if args.manifest else list_inputs(args.inputs)
        model = create_backbone(args.backbone, seed=args.seed, config=args.arch, num_heads=args.num_heads,
                                head_dim=args.head_dim)
        info = model.info
        source = {"backbone": str(args.backbone), "format": info.format, "backbone_name": info.name,
                  "backbone_info": info.describe()}
        if info.format == "random":
            source["backbone"] = f"random:{args.backbone}:seed={args.seed}"
        sha = info.weights_sha256
        n_blocks = args.n_blocks if args.n_blocks is not None else min(4, model.cfg.depth)
        # The transform the weights record, at another size / squaring mode when asked.
        tf = dataclasses.replace(info.transform, size=args.size or info.transform.size, mode=args.mode)
        settings = EmbedSettings(n_blocks=n_blocks, batch_size=args.batch_size, chunk_size=args.chunk_size,
                                 workers=args.workers, feature_dtype=args.feature_dtype, autocast=args.precision,
                                 keep_parts=args.keep_parts, pack=not args.no_pack, compile=args.compile,
                                 cuda_graphs=args.cuda_graphs, sdpa=args.sdpa)
        blocks = list(range(model.cfg.depth - n_blocks, model.cfg.depth))
        file_meta = {**source, "backbone_sha256": sha, "backbone_config": model.cfg.to_dict(),
                     "transform": tf.to_dict(), "blocks": blocks}
        if rank == 0 and not args.quiet:
            dest = " and ".join(str(d) for d in (out, args.tokens) if d)
            print(f"embedding {len(paths)} images with {info.summary()} on {device} "
                  f"({args.precision}, world size {world}) -> {dest}", file=sys.stderr)
        sinks: list = []
        if out is not None:
            sinks.append(PooledFileWriter(out, paths, ids, n_blocks=n_blocks, chunk_size=args.chunk_size,
                                          feature_dtype=args.feature_dtype, autocast=args.precision, meta=file_meta,
                                          keep_parts=args.keep_parts, settings=dataclasses.asdict(settings)))
        if args.tokens:
            from chexfound.adapt.token_cache import TokenCacheWriter

            sinks.append(TokenCacheWriter(args.tokens, model, paths, ids, tf, n_blocks, args.flip_tta, sha))
        metrics = sinks[0].metrics_path if out is not None else Path(args.tokens) / "metrics.jsonl"
        run = run_engine(model, tf, paths, sinks, settings, device, progress=not args.quiet, metrics=metrics)
    finally:
        D.destroy()  # only a process group this command started
    if not run.results:
        return 0
    skipped = run.results[0].skipped if out is not None else _cache_errors(run.results[-1])
    where = out.with_name(out.stem + ".skipped.csv") if out is not None else Path(args.tokens) / SKIPPED_FILE
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s) (listed in {where}):", file=sys.stderr)
        for i, p, reason in skipped[:20]:
            print(f"  {reason if p in reason else f'{p}: {reason}'}", file=sys.stderr)
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more", file=sys.stderr)
    if not args.quiet:
        dest = " and ".join(str(d) for d in (out, args.tokens) if d)
        print(f"wrote the embeddings of {len(paths) - len(skipped)} images to {dest} ({run.computed_chunks} "
              f"chunk(s) computed now, {run.seconds:.1f} s)")
    return 1 if (args.strict and skipped) else 0


def _cache_errors(root: Path) -> list[tuple[int, str, str]]:
    from chexfound.adapt.token_cache import FeatureCache

    return FeatureCache.open(root).errors
