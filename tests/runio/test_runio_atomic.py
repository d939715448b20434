"""Atomic files: all or nothing, no temp files left behind, usual permissions, writers that pick a format by suffix."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from chexfound.runio import atomic_output, atomic_write_bytes, atomic_write_json, atomic_write_text


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_bytes_text_json_round_trip_and_return_the_path(tmp_path):
    assert atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01") == tmp_path / "a" / "b.bin"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"  # missing folders are created
    atomic_write_text(tmp_path / "t.txt", "grüße\n")
    assert (tmp_path / "t.txt").read_bytes() == "grüße\n".encode()
    p = atomic_write_json(tmp_path / "m.json", {"auroc": np.float32(0.5), "ci": (math.nan, 1.0)}, indent=None)
    assert p.read_text() == '{"auroc": 0.5, "ci": [null, 1.0]}\n'
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "a") == []


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_output(target) as tmp:
            tmp.write_text("half of the new conte")
            raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []
    # JSON that cannot be written fails before anything is touched
    with pytest.raises(TypeError, match="object"):
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_an_interrupt_is_cleaned_up_too(tmp_path):
    target = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert not target.exists() and _leftovers(tmp_path) == []


def test_the_temp_path_keeps_the_suffix_for_format_picking_writers(tmp_path):
    # np.save appends .npy to a name without it; pandas picks gzip from .gz; PIL picks PNG from .png
    with atomic_output(tmp_path / "status.npy") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".status.npy.") and tmp.suffix == ".npy"
        np.save(tmp, np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "status.npy"), np.arange(3))
    import pandas as pd

    with atomic_output(tmp_path / "m.csv.gz") as tmp:
        pd.DataFrame({"a": [1, 2]}).to_csv(tmp, index=False)
    assert (tmp_path / "m.csv.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
    from PIL import Image

    with atomic_output(tmp_path / "p.png") as tmp:
        Image.new("L", (2, 2)).save(tmp)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(tmp_path) == []


def test_files_get_the_usual_permissions_not_the_temp_files_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "shared.csv", b"x")
        atomic_write_bytes(tmp_path / "fast.png", b"x", fsync=False)
    finally:
        os.umask(old)
    for name in ("shared.csv", "fast.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_replacing_is_atomic_for_a_reader(tmp_path):
    # A reader holding the old file keeps reading the old bytes; a new open sees the whole new file.
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"v": 1})
    with open(target) as held:
        atomic_write_json(target, {"v": 2})
        assert json.load(held) == {"v": 1}
    assert json.loads(target.read_text()) == {"v": 2}
