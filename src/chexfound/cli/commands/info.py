"""`chexfound info FILE...`: what the reader made of each file (format, size, bit depth, photometric,
spacing, view, ids), optional preview PNGs, bad files listed at the end."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from chexfound.errors import ChexfoundError, CXRReadError
from chexfound.io import MIN_SIZE, CXRImage, read_image
from chexfound.io.read import DICOM_SUFFIXES
from chexfound.runio import atomic_output

_SCAN_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"} | DICOM_SUFFIXES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info", help="read chest X-ray files and report what was read",
        description="Read each FILE (DICOM, PNG, JPEG, ...; folders are scanned for images) and print what "
                    "was read. Unreadable files are listed at the end. Exit status: 0 when at least one image was "
                    "read; 1 when none could be (every file unreadable) or, with --strict, when any file could "
                    "not be read; 2 for a usage error (no image files in the folders given, bad options).")
    p.add_argument("files", nargs="+", metavar="FILE", help="image files or folders")
    p.add_argument("--preview", metavar="DIR", help="write an 8-bit preview PNG of each image (as displayed) here")
    p.add_argument("--preview-size", type=int, default=512, metavar="PX",
                   help="longest side of previews (0: original size; default 512)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any file cannot be read")
    p.add_argument("--no-voi", action="store_true", help="ignore DICOM window/VOI LUT (show the full range)")
    p.add_argument("--color", choices=["error", "luminance"], default="error",
                   help="real colour images: refuse (default) or convert to luminance")
    p.add_argument("--min-size", type=int, default=MIN_SIZE, metavar="PX",
                   help=f"refuse images whose shorter side is below this (default {MIN_SIZE}, one patch)")
    p.add_argument("--quiet", action="store_true", help="only the summary and the bad files")
    p.set_defaults(func=run)


def _expand(args: list[str]) -> list[Path]:
    out: list[Path] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in _SCAN_SUFFIXES))
        else:
            out.append(p)  # missing files are reported by the reader
    return out


def _fmt(img: CXRImage) -> str:
    m = img.meta
    fmt = m.get("source_format", "?")
    if fmt == "DICOM":
        fmt += f" ({m.get('transfer_syntax_name')}{'' if m.get('has_file_meta') else ', no file meta'})"
    h, w = img.shape
    parts = [fmt, f"{h}x{w}", f"{m.get('bit_depth', '?')}-bit", str(m.get("photometric_interpretation", "?"))
             + (" (inverted)" if m.get("inverted") else "")]
    sp = m.get("pixel_spacing")
    parts.append(f"spacing {sp[0]:g}x{sp[1]:g} mm" if sp else "spacing -")
    if m.get("voi") == "window":
        parts.append("window {:g}/{:g}".format(*m["window"]))
    elif m.get("voi") == "lut":
        parts.append("VOI LUT")
    for key, label in (("modality", "modality"), ("view_position", "view"), ("patient_id", "patient"),
                       ("study_id", "study")):
        if m.get(key):
            parts.append(f"{label} {m[key]}")
    return "  ".join(parts)


def _preview_name(path: Path, used: set[str]) -> str:
    stem = path.stem if path.suffix else path.name
    name, k = f"{stem}.png", 1
    while name in used:
        k += 1
        name = f"{stem}-{k}.png"
    used.add(name)
    return name


def _write_preview(img: CXRImage, out: Path, size: int) -> None:
    im = Image.fromarray(img.to_uint8(), mode="L")
    if size and max(im.size) > size:
        scale = size / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    with atomic_output(out) as tmp:
        im.save(tmp, format="PNG")


def run(args: argparse.Namespace) -> int:
    files = _expand(args.files)
    if not files:
        raise ChexfoundError("no image files found in " + ", ".join(args.files))
    preview_dir = Path(args.preview) if args.preview else None
    if preview_dir:
        preview_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    records: list[dict[str, Any]] = []
    bad: list[tuple[str, str]] = []
    for f in files:
        try:
            img = read_image(f, min_size=args.min_size or None, color=args.color, apply_voi=not args.no_voi)
        except CXRReadError as e:
            bad.append((str(f), e.reason))
            records.append({"path": str(f), "ok": False, "error": e.reason})
            continue
        rec: dict[str, Any] = {"path": str(f), "ok": True, "shape": list(img.shape), "meta": img.meta}
        if preview_dir:
            out = preview_dir / _preview_name(f, used)
            _write_preview(img, out, args.preview_size)
            rec["preview"] = str(out)
        records.append(rec)
        if not args.json and not args.quiet:
            print(f"{f}: {_fmt(img)}" + (f"  -> {rec['preview']}" if "preview" in rec else ""))
        for w in img.meta.get("warnings", []):  # e.g. a MONOCHROME1 header over MONOCHROME2-looking pixels
            print(f"warning: {f}: {w}", file=sys.stderr)
    n_ok = len(files) - len(bad)
    if preview_dir and bad:  # the run folder keeps the skipped list, like every batch command
        from chexfound.runio import SKIPPED_FILE, skipped_rows, write_skipped

        write_skipped(preview_dir / SKIPPED_FILE, skipped_rows("info", bad))
    if args.json:
        json.dump({"files": records, "read": n_ok, "failed": len(bad)}, sys.stdout, indent=2, default=str)
        print()
    else:
        print(f"{n_ok} of {len(files)} file(s) read" + (f", {len(bad)} could not be read:" if bad else ""))
        for path, reason in bad:
            print(f"  {path}: {reason}")
    if n_ok == 0:  # nothing to show is a failure a script must see, strict or not
        print(f"error: no image could be read from {len(files)} file(s)", file=sys.stderr)
        return 1
    return 1 if bad and args.strict else 0
