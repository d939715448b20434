"""`chexfound curate`: build a deduplicated, cached pretraining corpus from a YAML corpus spec."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "curate",
        help="pool, filter, deduplicate and cache CXR datasets into one pretraining corpus",
        description="Pool the sources of a corpus spec (YAML), filter by metadata, remove exact and near "
                    "duplicates (within and across sources), cache resized PNGs and write DIR/manifest.csv, "
                    "DIR/duplicates.csv and a report. Rerunning with the same --out resumes.",
    )
    p.add_argument("--spec", required=True, help="corpus spec YAML (sources, filters, dedup, cache, report)")
    p.add_argument("--out", required=True, help="output folder (reused to resume)")
    p.add_argument("--exclude", default=None,
                   help="CSV with source,patient_id columns: every image of those patients is removed "
                        "(source may name a source or its patient_namespace; without it ids match everywhere)")
    p.add_argument("--workers", type=int, default=2, help="decode worker processes (0 = in this process)")
    p.add_argument("--size", type=int, default=None, help="override cache.size (shorter side, pixels)")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=None, help="override cache.bit_depth")
    p.add_argument("--format", choices=("png", "tar"), default=None, help="override cache.format")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any spec key, e.g. --set dedup.phash_threshold=16 (repeatable)")
    p.add_argument("--device", default="auto", help="device for embedding dedup (auto: cuda if available)")
    p.add_argument("--batch-size", type=int, default=None, help="override dedup.embedding.batch_size")
    p.add_argument("--seed", type=int, default=None, help="override report.seed (contact-sheet sampling)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N images of every source (a quick trial of a spec; sets sources[*].limit)")
    p.add_argument("--retry-quarantined", action="store_true", help="try again files that failed to decode before")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any file was quarantined")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # interruption test hook
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from chexfound.curate.pipeline import run_curation
    from chexfound.curate.spec import load_spec

    overrides = list(args.set)
    if args.size is not None:
        overrides.append(f"cache.size={args.size}")
    if args.bit_depth is not None:
        overrides.append(f"cache.bit_depth={args.bit_depth}")
    if args.format is not None:
        overrides.append(f"cache.format={args.format}")
    if args.seed is not None:
        overrides.append(f"report.seed={args.seed}")
    spec = load_spec(args.spec, overrides)
    if args.limit is not None:
        for src in spec.sources:
            src.limit = args.limit
    if args.batch_size is not None and spec.dedup.embedding is not None:
        spec.dedup.embedding.batch_size = args.batch_size
    res = run_curation(spec, args.out, exclude=args.exclude, workers=args.workers, stop_after=args.stop_after,
                       retry_errors=args.retry_quarantined, progress=not args.quiet, device=args.device,
                       on_stage=(lambda s: None) if args.quiet else (lambda s: print(f"curate: {s}", file=sys.stderr)))
    if not res.complete:
        print(f"curate: stopped after {res.processed_now} images (rerun the same command to resume)", file=sys.stderr)
        return 3
    print(f"curate: {res.n_items} listed, {res.n_kept} kept, {res.n_duplicates} duplicates, "
          f"{res.n_filtered} filtered, {res.n_quarantined} quarantined "
          f"({res.processed_now} decoded now, {res.reused} reused) -> {res.out}/manifest.csv")
    if res.n_quarantined:
        print(f"curate: {res.n_quarantined} unreadable file(s) listed in {res.out}/quarantine.csv", file=sys.stderr)
        if args.strict:
            return 1
    return 0
