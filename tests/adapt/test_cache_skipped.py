"""The token cache lists unreadable images in the run-folder contract's skipped.csv, and still reads the reasons
of caches built before it (errors.jsonl)."""

from __future__ import annotations

import json

from chexfound.adapt.token_cache import FeatureCache
from chexfound.runio import read_skipped


def test_cache_writes_skipped_csv_and_reads_an_older_errors_jsonl(tmp_path, tiny_backbone, nih_paths):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    root = tmp_path / "c"
    cache = FeatureCache.build(tiny_backbone, [nih_paths[0], bad], root, n_blocks=1, batch_size=2)
    rows = read_skipped(root / "skipped.csv")
    assert [(s.stage, s.index, s.path) for s in rows] == [("features", 1, str(bad))] and rows[0].reason
    assert cache.errors == [(1, str(bad), rows[0].reason)]
    # A cache from before skipped.csv: its errors.jsonl still gives the reasons.
    (root / "skipped.csv").unlink()
    (root / "errors.jsonl").write_text(json.dumps({"row": 1, "path": str(bad), "error": "old reason"}) + "\n")
    assert FeatureCache.open(root).errors == [(1, str(bad), "old reason")]
