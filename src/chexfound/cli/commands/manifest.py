"""`chexfound manifest`: build a manifest (CSV or Parquet) from a public dataset's own label files."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

from chexfound.data.readers import READERS
from chexfound.errors import ChexfoundError

# CLI option -> reader keyword; a reader receives only those it accepts.
_OPTIONS = {
    "image_root": "image_root", "missing": "missing", "patient_regex": "patient_regex", "vote": "vote",
    "labeler": "labeler", "frontal_only": "frontal_only", "min_count": "min_count",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "manifest", help="build a manifest from a dataset's label files",
        description="Turn a public dataset's own label files / folder layout into a chexfound manifest "
                    "(path, patient_id, study/view/split, one column per finding: 1/0/-1 uncertain/blank).")
    p.add_argument("--format", required=True, choices=sorted(READERS), help="dataset layout")
    p.add_argument("--root", required=True, metavar="DIR", help="dataset folder (where its label files are)")
    p.add_argument("--out", required=True, metavar="FILE", help="manifest to write (.csv, .csv.gz or .parquet)")
    p.add_argument("--image-root", metavar="DIR",
                   help="folder the image paths are relative to, if not --root (nih14, mimic, cxrlt24)")
    p.add_argument("--missing", choices=["drop", "keep", "error"], default=None,
                   help="rows whose image file is missing: drop (default, with a warning), keep, or error")
    p.add_argument("--split-seed", type=int, default=None, help="seed of a patient-level split (default 0)")
    p.add_argument("--split-fractions", default=None, metavar="F,F,F",
                   help="patient-level split fractions, e.g. 0.7,0.1,0.2 (replaces any official split)")
    p.add_argument("--split-names", default="train,val,test", metavar="N,N,N", help="names of the split parts")
    p.add_argument("--split-within", metavar="NAME",
                   help="only re-split rows of this existing split (e.g. carve val out of an official train)")
    p.add_argument("--patient-regex", metavar="RX", help="folder: patient id = first group of RX in file name")
    p.add_argument("--vote", choices=["majority", "any"], default=None, help="vindr: radiologist aggregation")
    p.add_argument("--labeler", choices=["chexpert", "negbio"], default=None, help="mimic: label file")
    p.add_argument("--frontal-only", action="store_true", default=None, help="chexpert: drop lateral views")
    p.add_argument("--min-count", type=int, default=None, help="padchest: keep findings with >= N images")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ChexfoundError(f"--split-fractions must be numbers separated by commas, not {text!r}") from None


def run(args: argparse.Namespace) -> int:
    reader = READERS[args.format]
    accepted = set(inspect.signature(reader).parameters)
    kwargs: dict[str, Any] = {}
    for opt, kw in _OPTIONS.items():
        value = getattr(args, opt)
        if value is None:
            continue
        if kw not in accepted:
            raise ChexfoundError(f"--{opt.replace('_', '-')} does not apply to --format {args.format}")
        kwargs[kw] = value
    root = Path(args.root)
    if not root.is_dir():
        raise ChexfoundError(f"--root {root}: not a folder")
    m = reader(root, **kwargs)
    notes = []
    if args.split_fractions is not None or args.split_seed is not None or args.split_within:
        fractions = _floats(args.split_fractions or "0.7,0.1,0.2")
        names = [n.strip() for n in args.split_names.split(",") if n.strip()]
        if len(names) != len(fractions):
            raise ChexfoundError(f"{len(fractions)} split fractions but {len(names)} names ({names})")
        try:
            had_split = "split" in m.df.columns
            m = m.with_patient_split(fractions, names, seed=args.split_seed or 0, within=args.split_within)
        except ValueError as e:
            raise ChexfoundError(f"bad split: {e}") from e
        if had_split and not args.split_within:
            notes.append("the dataset's own split was replaced by a patient-level split")
    out = m.save(args.out)
    if not args.quiet:
        df = m.df
        print(f"wrote {out}: {len(df)} images, {df['patient_id'].nunique()} patients, "
              f"{len(m.label_columns)} label column(s)")
        if "split" in df.columns:
            counts = df["split"].fillna("(none)").value_counts()
            print("  split: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        dropped = m.df.attrs.get("dropped_missing")
        if dropped:
            print(f"  dropped {dropped} row(s) whose image file is missing (--missing keep|error to change)")
        y = m.labels()
        if len(y) and m.label_columns:
            import numpy as np

            pos = np.nansum(y == 1, axis=0).astype(int)
            top = sorted(zip(pos, m.label_columns), reverse=True)[:5]
            print("  most frequent: " + ", ".join(f"{n} {c}" for c, n in top))
        for n in notes:
            print(f"  note: {n}")
    return 0
