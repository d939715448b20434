"""Which copy of a duplicate group is kept: a stated quality order over the decoded records.

`quality` (the default), best first:
  1. lossless before lossy: a JPEG / lossy JPEG 2000 copy (DICOM transfer syntax, or Lossy Image
     Compression = 01 in the header) never wins over a PNG, uncompressed or reversible-J2K copy;
  2. more pixels (original rows x columns);
  3. more grey levels: the bits of grey-level information the decoded pixels actually carry
     (log2 of the distinct levels), so a 16-bit re-encode of 8-bit data does not count as deeper;
  4. earlier source in the spec (its `sources` order is the user's preference between datasets);
  5. the path, so the choice is deterministic.
`largest` puts pixel count first (then lossless, grey levels, source order, path); `source_order` puts
the source first (then the quality order). Exact and near duplicates both keep the best-ranked member.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

KEEP_RULES = {
    "quality": ("lossy", "pixels", "grey_bits", "source", "path"),
    "largest": ("pixels", "lossy", "grey_bits", "source", "path"),
    "source_order": ("source", "lossy", "pixels", "grey_bits", "path"),
}

_WORDS = {"lossy": "lossless before lossy", "pixels": "more pixels", "grey_bits": "more grey levels",
          "source": "earlier source", "path": "path"}


def describe(rule: str) -> str:
    return ", then ".join(_WORDS[k] for k in KEEP_RULES[rule])


def grey_bits(pixels: np.ndarray) -> int:
    """Bits of grey-level information in a [0, 1] image: log2 of its distinct levels at 16-bit precision."""
    q = (np.clip(pixels, 0.0, 1.0) * np.float32(65535.0) + np.float32(0.5)).astype(np.uint16)
    levels = int(np.count_nonzero(np.bincount(q.ravel(), minlength=65536)))
    return int(np.ceil(np.log2(max(levels, 1))))


def keep_rank(table: pd.DataFrame, rule: str) -> np.ndarray:
    """Rank of every row (0 = kept first) under `rule`. Needs the record columns orig_width, orig_height,
    lossy, grey_bits and the item columns source_index, rel_path."""
    # lossless 0, unknown 1, lossy 2: a copy whose compression is unknown is kept only over a lossy one
    lossy = table["lossy"].map(lambda v: 1 if v is None or (isinstance(v, float) and np.isnan(v)) else 2 * bool(v))
    keys = {
        "lossy": lossy.to_numpy(dtype=np.int64),
        "pixels": -(table["orig_width"].astype(float) * table["orig_height"].astype(float)).to_numpy(),
        "grey_bits": -table["grey_bits"].astype(float).fillna(0).to_numpy(),
        "source": table["source_index"].to_numpy(),
        "path": table["rel_path"].astype(str).to_numpy(),
    }
    order = np.lexsort(tuple(keys[k] for k in reversed(KEEP_RULES[rule])))  # lexsort: last key is primary
    rank = np.empty(len(table), dtype=np.int64)
    rank[order] = np.arange(len(table))
    return rank
