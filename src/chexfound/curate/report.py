"""Outputs of a curation run: manifest, duplicates/quarantine/filtered lists, figures and the report.

The report (report.md and report.html, same content) has counts per source and per rule, the duplicates
found (by method and by source pair), a histogram of original image sizes, and contact sheets of random
kept images and of random duplicate pairs (removed | kept), all drawn from the cache.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from chexfound.curate import keep as keep_rules
from chexfound.curate.filters import RULES_POST, RULES_PRE
from chexfound.curate.image_cache import decode_png, read_cached
from chexfound.curate.hashing import hamming_hex
from chexfound.curate.spec import CorpusSpec
from chexfound.runio import atomic_write_bytes, atomic_write_json, atomic_write_text

_TILE = 160


def _csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def manifest_frame(t: pd.DataFrame, fmt: str) -> pd.DataFrame:
    """Kept images in the standard manifest format (path relative to the run folder)."""
    k = t[t["status"] == "kept"]
    view = [v if isinstance(v, str) and v.strip() else hv for v, hv in zip(k["view"], k["view_position"])]
    df = pd.DataFrame({
        "path": (k["file"] if fmt == "png" else k["member"]).to_numpy(),
        "patient_id": k["patient_id"].to_numpy(),
        "source": k["source"].to_numpy(),
        "image_id": [i if isinstance(i, str) and i else Path(r).name for i, r in zip(k["image_id"], k["rel_path"])],
        "study_id": k["study_id"].to_numpy(),
        "view": view,
        "age": k["age"].to_numpy(),
        "sex": k["sex"].to_numpy(),
        "width": k["width"].astype(int).to_numpy(),
        "height": k["height"].astype(int).to_numpy(),
        "orig_width": k["orig_width"].astype(int).to_numpy(),
        "orig_height": k["orig_height"].astype(int).to_numpy(),
        "source_split": k["split"].to_numpy(),
        "patient_key": k["patient_raw"].to_numpy(),
        "source_path": k["path"].to_numpy(),
        "exact_hash": k["exact"].to_numpy(),
        "phash": k["phash"].to_numpy(),
    })
    if fmt == "tar":
        df.insert(1, "shard", k["file"].to_numpy())
        df.insert(2, "offset", k["offset"].astype(np.int64).to_numpy())
        df.insert(3, "length", k["length"].astype(np.int64).to_numpy())
    # an all-empty optional column would read back as a (label) column of NaNs: leave it out
    optional = ["study_id", "view", "age", "sex", "source_split"]
    empty = [c for c in optional if df[c].map(lambda v: v is None or (isinstance(v, float) and np.isnan(v))
                                              or (isinstance(v, str) and not v.strip())).all()]
    return df.drop(columns=empty)


def duplicates_frame(t: pd.DataFrame) -> pd.DataFrame:
    d = t[t["status"] == "duplicate"]
    by_key = t.set_index("key")
    kept = by_key.loc[d["dup_of"].to_numpy()]
    cos = np.where(d["dup_method"] == "embedding", d["dup_score"], np.nan)
    return pd.DataFrame({
        "source": d["source"].to_numpy(), "path": d["path"].to_numpy(), "patient_id": d["patient_id"].to_numpy(),
        "kept_source": kept["source"].to_numpy(), "kept_path": kept["path"].to_numpy(),
        "kept_patient_id": kept["patient_id"].to_numpy(),
        "method": d["dup_method"].to_numpy(),
        # the perceptual-hash distance to the kept image, whatever matched them (0 for exact copies)
        "phash_distance": [hamming_hex(a, b) for a, b in zip(d["phash"], kept["phash"])],
        "cosine": cos,
        "size": [f"{int(w)}x{int(h)}" for w, h in zip(d["orig_width"], d["orig_height"])],
        "kept_size": [f"{int(w)}x{int(h)}" for w, h in zip(kept["orig_width"], kept["orig_height"])],
        # what the keep rule compared (curate/keep.py): the kept copy is never worse in the rule's order
        "quality": [_quality(lo, b) for lo, b in zip(d["lossy"], d["grey_bits"])],
        "kept_quality": [_quality(lo, b) for lo, b in zip(kept["lossy"], kept["grey_bits"])],
        "key": d["key"].to_numpy(), "kept_key": d["dup_of"].to_numpy(),
    })


def _quality(lossy: object, bits: object) -> str:
    kind = "compression unknown" if lossy is None or (isinstance(lossy, float) and np.isnan(lossy)) else (
        "lossy" if lossy else "lossless")
    return kind if bits is None or (isinstance(bits, float) and np.isnan(bits)) else f"{kind}, {int(bits)} grey bits"


def counts_frame(t: pd.DataFrame, sources: list[str]) -> pd.DataFrame:
    rows = []
    for s in sources + ["total"]:
        g = t if s == "total" else t[t["source"] == s]
        row: dict[str, Any] = {"source": s, "listed": len(g)}
        for stage, rules in (("pre", RULES_PRE), ("post", RULES_POST)):
            for r in rules:
                row[f"{stage}:{r}"] = int(((g["rule"] == r) & (g["stage"] == stage)).sum())
        row["quarantined"] = int((g["status"] == "quarantined").sum())
        for m in ("exact", "phash", "embedding"):
            row[f"dup:{m}"] = int(((g["status"] == "duplicate") & (g["dup_method"] == m)).sum())
        row["kept"] = int((g["status"] == "kept").sum())
        rows.append(row)
    df = pd.DataFrame(rows)
    zero = [c for c in df.columns if c.startswith(("pre:", "post:", "dup:")) and (df[c] == 0).all()]
    return df.drop(columns=zero)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # older Pillow
        return ImageFont.load_default()


def _tile(out: Path, rec: dict[str, Any], caption: str) -> Image.Image:
    tile = Image.new("L", (_TILE, _TILE + 14), 0)
    try:
        px = decode_png(read_cached(out, rec))
        im = Image.fromarray(np.rint(px * 255).astype(np.uint8))
        scale = min(_TILE / im.width, _TILE / im.height)  # small images are enlarged to be seen
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR)
        tile.paste(im, ((_TILE - im.width) // 2, (_TILE - im.height) // 2))
    except Exception as e:  # a cache file removed by hand should not break the report
        caption = f"unreadable: {e}"[:40]
    ImageDraw.Draw(tile).text((2, _TILE + 1), caption[:30], fill=255, font=_font())
    return tile


def contact_sheet(out: Path, recs: list[dict[str, Any]], captions: list[str], cols: int) -> Image.Image:
    rows = max(1, -(-len(recs) // cols))
    sheet = Image.new("L", (cols * (_TILE + 4), rows * (_TILE + 18)), 40)
    for k, (r, c) in enumerate(zip(recs, captions)):
        sheet.paste(_tile(out, r, c), ((k % cols) * (_TILE + 4), (k // cols) * (_TILE + 18)))
    return sheet


def _save_png(img: Image.Image, path: Path) -> None:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def size_histogram(t: pd.DataFrame, path: Path, sources: list[str]) -> pd.DataFrame:
    """Histogram of the original shorter side per source (only decoded images), as a figure and a table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = t[t["orig_width"].notna()]
    side = np.minimum(ok["orig_width"].astype(float), ok["orig_height"].astype(float))
    edges = np.array([0, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, np.inf])
    table = pd.DataFrame({"shorter side": [f"[{int(a)}, {'inf' if np.isinf(b) else int(b)})"
                                           for a, b in zip(edges[:-1], edges[1:])]})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    hi = float(side.max()) if len(side) else 1024.0
    bins = np.geomspace(max(1.0, float(side.min()) / 1.2) if len(side) else 1.0, hi * 1.2, 40)
    for s in sources:
        v = side[ok["source"] == s].to_numpy()
        table[s] = np.histogram(v, bins=edges)[0]
        if len(v):
            ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label=s)
    ax.set_xscale("log")
    ax.set_xlabel("original shorter side (pixels)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return table


def _md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if (isinstance(v, float) and np.isnan(v)) else str(v) for v in row) + " |")
    return "\n".join(lines)


def write_outputs(t: pd.DataFrame, spec: CorpusSpec, out: Path, dstats: dict[str, Any]) -> dict[str, Any]:
    fmt = spec.cache.format
    sources = [s.name for s in spec.sources]
    man = manifest_frame(t, fmt)
    _csv(out / "manifest.csv", man)
    dups = duplicates_frame(t)
    _csv(out / "duplicates.csv", dups)
    q = t[t["status"] == "quarantined"]
    _csv(out / "quarantine.csv", pd.DataFrame({"source": q["source"], "path": q["path"], "reason": q["reason"]}))
    f = t[t["status"] == "filtered"]
    _csv(out / "filtered.csv", pd.DataFrame({"source": f["source"], "path": f["path"], "patient_id": f["patient_id"],
                                             "rule": f["rule"], "stage": f["stage"]}))
    if fmt == "tar":
        _csv(out / "index.csv", man[["path", "shard", "offset", "length", "source", "patient_id"]])

    counts = counts_frame(t, sources)
    figs = out / "figures"
    sizes = size_histogram(t, figs / "sizes.png", sources)
    rng = np.random.default_rng(spec.report.seed)
    kept = t[t["status"] == "kept"]
    pick = rng.choice(len(kept), size=min(spec.report.samples, len(kept)), replace=False) if len(kept) else []
    sample_recs = [kept.iloc[int(k)].to_dict() for k in sorted(pick)]
    if sample_recs:
        _save_png(contact_sheet(out, sample_recs, [f"{r['source']} {int(r['orig_width'])}x{int(r['orig_height'])}"
                                                   for r in sample_recs], cols=8), figs / "samples.png")
    pair_recs, pair_caps = [], []
    if len(dups):
        by_key = t.set_index("key")
        pp = rng.choice(len(dups), size=min(spec.report.pairs, len(dups)), replace=False)
        for k in sorted(pp):
            d = dups.iloc[int(k)]
            how = d["method"] if d["method"] == "exact" else (
                f"phash d={d['phash_distance']}" if d["method"] == "phash" else f"cos={d['cosine']:.3f}")
            pair_recs += [by_key.loc[d["key"]].to_dict(), by_key.loc[d["kept_key"]].to_dict()]
            pair_caps += [f"DROP {d['source']} {how}", f"KEEP {d['kept_source']}"]
        _save_png(contact_sheet(out, pair_recs, pair_caps, cols=6), figs / "duplicate_pairs.png")

    cross = pd.DataFrame()
    if len(dups):
        cross = pd.crosstab(dups["source"], dups["kept_source"]).reset_index()
        cross = cross.rename(columns={"source": "removed \\ kept"})
    summary = {
        "listed": int(len(t)), "kept": int(len(man)), "duplicates": int(len(dups)),
        "quarantined": int(len(q)), "filtered": int(len(f)),
        "duplicates_by_method": {str(k): int(v) for k, v in dups["method"].value_counts().items()} if len(dups) else {},
        "dedup": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in dstats.items()},
        "per_source": counts.to_dict("records"),
    }
    atomic_write_json(out / "summary.json", summary, indent=1)
    sections = [
        ("Counts per source and rule", counts,
         "pre: rules on manifest metadata before decoding; post: rules needing pixels or the file header; "
         "dup: removed as a duplicate of a kept image (exact pixels, perceptual hash, or embedding)."),
        ("Duplicates by source pair", cross, "Rows: source of the removed image; columns: source of the kept one."),
        ("Original image sizes", sizes, "Counts of the shorter side of decoded images."),
    ]
    keep_rule = f"{spec.dedup.keep} ({keep_rules.describe(spec.dedup.keep)})"
    intro = [
        f"{len(t)} images listed from {len(sources)} source(s); {len(man)} kept, {len(dups)} duplicates removed, "
        f"{len(q)} quarantined (unreadable), {len(f)} filtered.",
        f"Dedup: exact={spec.dedup.exact}, pHash threshold={spec.dedup.phash_threshold} of {spec.dedup.phash_bits} "
        f"bits, embedding={'off' if spec.dedup.embedding is None else spec.dedup.embedding.threshold}; keep rule: "
        f"{keep_rule}. Index: {dstats.get('phash_plan', 'n/a')}; {dstats.get('phash_candidates', 0)} candidates "
        f"verified, {dstats.get('phash_pairs', 0)} near pairs.",
        f"Cache: shorter side {spec.cache.size} px, {spec.cache.bit_depth}-bit PNG, layout {fmt}.",
    ]
    figures = [("Size histogram", "figures/sizes.png")]
    if sample_recs:
        figures.append((f"{len(sample_recs)} random kept images", "figures/samples.png"))
    if pair_recs:
        figures.append((f"{len(pair_recs) // 2} random duplicate pairs (removed | kept)",
                        "figures/duplicate_pairs.png"))
    md = ["# Curation report", "", *[f"- {x}" for x in intro], ""]
    for title, df, note in sections:
        md += [f"## {title}", "", note, "", _md_table(df) if len(df) else "(none)", ""]
    for title, src in figures:
        md += [f"## {title}", "", f"![{title}]({src})", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>Curation report</title>",
         "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style></head><body>",
         "<h1>Curation report</h1><ul>", *[f"<li>{html.escape(x)}</li>" for x in intro], "</ul>"]
    for title, df, note in sections:
        h += [f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p>",
              df.to_html(index=False, na_rep="") if len(df) else "<p>(none)</p>"]
    for title, src in figures:
        h += [f"<h2>{html.escape(title)}</h2><img src='{src}' style='max-width:100%'>"]
    h.append("</body></html>")
    atomic_write_text(out / "report.html", "\n".join(h))
    return summary
