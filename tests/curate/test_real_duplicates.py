"""Precision/recall of pixel-based duplicate finding on the real NIH folders, against image_id ground truth.

nih14 (512 px), nih14-fullres (1024 px) and nih14-tiny64 (64x64 RGB) are the same NIH release at different
sizes; some images are in two of them. File names are never used to match: only the decoded pixels.
Kermany images (a different population) are mixed in to check that nothing crosses datasets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from chexfound.curate.dedup import phash_edges
from chexfound.curate.hashing import phash
from chexfound.curate.spec import DedupSpec
from chexfound.io import read_image

THRESHOLD = DedupSpec().phash_threshold


@pytest.fixture(scope="module")
def hashed(data_root) -> pd.DataFrame:
    frames = []
    for src in ("nih14", "nih14-fullres", "nih14-tiny64"):
        df = pd.read_csv(data_root / src / "labels.csv", dtype=str)[["path", "image_id"]]
        df["source"] = src
        frames.append(df)
    ker = pd.read_csv(data_root / "kermany" / "labels.csv", dtype=str).iloc[::12][["path"]]  # every 12th
    ker["image_id"], ker["source"] = "kermany:" + ker["path"], "kermany"
    frames.append(ker)
    df = pd.concat(frames, ignore_index=True)
    df["phash"] = [phash(read_image(data_root / s / p).pixels) for s, p in zip(df["source"], df["path"])]
    return df


def test_precision_recall_against_image_ids(hashed):
    df = hashed
    e = phash_edges(df["phash"].tolist(), np.arange(len(df)), THRESHOLD)
    found = {frozenset((int(i), int(j))) for i, j in zip(e.i, e.j)}
    truth = set()
    for _, g in df[df["source"] != "kermany"].groupby("image_id"):
        idx = g.index.tolist()
        truth |= {frozenset((a, b)) for a in idx for b in idx if a < b}
    nih_found = {p for p in found if all(df.at[k, "source"] != "kermany" for k in p)}
    tp = len(nih_found & truth)
    precision = tp / max(len(nih_found), 1)
    recall = tp / len(truth)
    by_pair = {}
    for p in truth:
        a, b = sorted(p)
        key = tuple(sorted((df.at[a, "source"], df.at[b, "source"])))
        by_pair.setdefault(key, []).append(int(bin(int(df.at[a, "phash"], 16) ^ int(df.at[b, "phash"], 16)).count("1")))
    print(f"\nNIH duplicates: {len(truth)} true pairs, {len(nih_found)} found, precision {precision:.3f}, "
          f"recall {recall:.3f}; pHash distances of true pairs by source pair: {by_pair}")
    assert len(truth) >= 2 and precision == 1.0 and recall == 1.0
    # nothing matches across datasets (adult NIH vs paediatric Kermany)
    assert not [p for p in found if len({df.at[k, "source"] == "kermany" for k in p}) == 2]


def test_margin_between_copies_and_distinct_images(hashed):
    """The nearest *distinct* NIH image is much farther than any copy: the threshold sits in a wide gap."""
    df = hashed[hashed["source"] != "kermany"].reset_index(drop=True)
    w = np.array([[int(h[k:k + 16], 16) for k in range(0, 64, 16)] for h in df["phash"]], dtype=np.uint64)
    d = np.bitwise_count(w[:, None, :] ^ w[None, :, :]).sum(-1)
    same = df["image_id"].to_numpy()[:, None] == df["image_id"].to_numpy()[None, :]
    np.fill_diagonal(same, False)
    copies = d[same]
    distinct = d[~same & ~np.eye(len(df), dtype=bool)]
    print(f"\ncopies: max distance {copies.max()}; distinct images: min distance {distinct.min()} "
          f"(threshold {THRESHOLD})")
    assert copies.max() < THRESHOLD < distinct.min()
