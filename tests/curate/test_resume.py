"""Killed runs resume: finished images are not redone, the final outputs equal an uninterrupted run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from chexfound.curate.image_cache import RECORDS, RecordLog, decode_png, read_cached
from chexfound.curate.pipeline import run_curation
from chexfound.curate.spec import load_spec
from chexfound.errors import ConfigError

from .conftest import build_corpus


def _outputs(out: Path) -> dict[str, pd.DataFrame]:
    return {n: pd.read_csv(out / n) for n in ("manifest.csv", "duplicates.csv", "quarantine.csv", "filtered.csv")}


def _cache_stamps(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "cache").rglob("*.png")}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    res = run_curation(load_spec(corpus.spec), out, exclude=corpus.exclude, workers=0, progress=False)
    return res, out


def test_stop_and_resume_gives_same_output_without_redoing_work(corpus, reference, tmp_path):
    ref, ref_out = reference
    spec = load_spec(corpus.spec)
    todo = ref.processed_now
    k = todo // 2
    first = run_curation(spec, tmp_path, exclude=corpus.exclude, workers=0, stop_after=k, progress=False)
    assert not first.complete and first.processed_now == k
    assert not (tmp_path / "manifest.csv").exists()  # nothing final is written by an interrupted run
    assert len(RecordLog(tmp_path / RECORDS).load()) == k
    stamps = _cache_stamps(tmp_path)
    # a kill in the middle of appending leaves a torn last line: it must be ignored
    with open(tmp_path / RECORDS, "ab") as f:
        f.write(b'{"key": "nih14/images/torn", "sta')
    second = run_curation(spec, tmp_path, exclude=corpus.exclude, workers=0, progress=False)
    assert second.complete
    assert second.reused == k and second.processed_now == todo - k  # no redone work
    after = _cache_stamps(tmp_path)
    assert all(after[f] == t for f, t in stamps.items())  # files of the first run untouched
    got, want = _outputs(tmp_path), _outputs(ref_out)
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], obj=name)
    # a third run has nothing to do and changes nothing
    third = run_curation(spec, tmp_path, exclude=corpus.exclude, workers=0, progress=False)
    assert third.processed_now == 0 and third.reused == todo
    pd.testing.assert_frame_equal(_outputs(tmp_path)["manifest.csv"], want["manifest.csv"])


def test_changed_source_file_and_deleted_cache_file_are_redone(data_root, tmp_path):
    c = build_corpus(data_root, tmp_path / "c")
    out = tmp_path / "out"
    spec = load_spec(c.spec)
    first = run_curation(spec, out, workers=0, progress=False)
    # replace the blank image by a real one (new size + mtime) and delete one cached file
    blank = Path(c.blank)
    blank.write_bytes((data_root / "nih14-tiny64" / "train/1_abnormal/00000116_009.png").read_bytes())
    os.utime(blank, ns=(1, 1))
    victim = next((out / "cache" / "kermany").rglob("*.png"))
    victim.unlink()
    second = run_curation(spec, out, workers=0, progress=False)
    assert second.processed_now == 2 and second.reused == first.processed_now - 2
    assert victim.is_file()
    dups = pd.read_csv(out / "duplicates.csv")
    assert str(blank) in set(dups["path"])  # it is now a copy of the 116_009 original


def test_other_cache_settings_refuse_to_mix(corpus, reference):
    _, out = reference
    with pytest.raises(ConfigError, match="cache"):
        run_curation(load_spec(corpus.spec, ["cache.size=32"]), out, workers=0, progress=False)


def test_tar_shards_resume_and_index_offsets(data_root, tmp_path):
    c = build_corpus(data_root, tmp_path / "c", cache={"format": "tar", "shard_size": 4, "bit_depth": 16})
    out = tmp_path / "out"
    spec = load_spec(c.spec)
    first = run_curation(spec, out, workers=0, stop_after=5, progress=False)
    assert not first.complete and first.processed_now == 8  # whole shards of 4
    second = run_curation(spec, out, workers=0, progress=False)
    assert second.complete and second.reused == 8
    man = pd.read_csv(out / "manifest.csv")
    idx = pd.read_csv(out / "index.csv")
    assert {"shard", "offset", "length"} <= set(man.columns) and len(idx) == len(man)
    assert all((out / s).is_file() for s in man["shard"])
    recs = RecordLog(out / RECORDS).load()
    for _, row in man.iterrows():
        px = decode_png(read_cached(out, {"file": row["shard"], "member": row["path"], "offset": row["offset"],
                                          "length": row["length"]}))
        assert px.shape == (row["height"], row["width"]) and 0 <= px.min() and px.max() <= 1
    # 16-bit members: more than 256 grey levels survive for the large originals
    big = man[man["orig_width"] >= 512].iloc[0]
    px = decode_png(read_cached(out, {"file": big["shard"], "member": big["path"], "offset": big["offset"],
                                      "length": big["length"]}))
    assert len(set((px * 65535).round().ravel().tolist())) > 256
    assert json.loads((out / "summary.json").read_text())["kept"] == len(man) and len(recs) >= len(man)
