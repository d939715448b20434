"""End to end over real images: duplicates found by pixels, patients excluded, cache + manifest written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chexfound.curate.pipeline import CurateResult, run_curation
from chexfound.curate.spec import load_spec
from chexfound.data.manifest import read_manifest
from chexfound.io import read_image


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> tuple[CurateResult, Path]:
    out = tmp_path_factory.mktemp("curated")
    res = run_curation(load_spec(corpus.spec), out, exclude=corpus.exclude, workers=2, progress=False)
    return res, out


def _truth_pairs(listed: pd.DataFrame, corpus) -> set[frozenset[str]]:
    """Ground truth, independent of our hashes: same NIH image_id, identical decoded pixels, the copies we made."""
    pairs: set[frozenset[str]] = set()
    nih = listed[listed["source"].str.startswith("nih14")]
    for _, g in nih.groupby("image_id"):
        if len(g) > 1:
            pairs.add(frozenset(g["path"]))
    ker = listed[listed["source"] == "kermany"]["path"].tolist()
    px = {p: read_image(p).pixels for p in ker}
    for a in range(len(ker)):
        for b in range(a + 1, len(ker)):
            if px[ker[a]].shape == px[ker[b]].shape and np.array_equal(px[ker[a]], px[ker[b]]):
                pairs.add(frozenset((ker[a], ker[b])))
    full = listed[listed["image_id"] == "00000180_002.png"]["path"].tolist()
    pairs |= {frozenset((corpus.extra_exact, p)) for p in full}
    pairs.add(frozenset((corpus.extra_near, corpus.extra_near_of)))
    return pairs


def test_finds_true_duplicates_across_sources(run, corpus):
    res, out = run
    assert res.complete and res.n_items == corpus.n_listed
    dups = pd.read_csv(out / "duplicates.csv")
    filtered = pd.read_csv(out / "filtered.csv")
    from chexfound.curate.sources import list_items

    listed = list_items(load_spec(corpus.spec))
    listed = listed[~listed["path"].isin(filtered["path"]) & (listed["path"] != corpus.corrupt)]
    truth = _truth_pairs(listed, corpus)
    # a removed image must be a true duplicate of the kept one it names (precision) ...
    found = {frozenset((a, b)) for a, b in zip(dups["path"], dups["kept_path"])}
    assert found <= truth, found - truth
    # ... and every true group must end with one member kept (recall): connect the truth pairs
    kept = set(read_manifest(out / "manifest.csv").df["source_path"])
    groups: list[set[str]] = []
    for pair in truth:
        hit = [g for g in groups if g & pair]
        merged = set(pair).union(*hit)
        groups = [g for g in groups if not g & pair] + [merged]
    for g in groups:
        assert len(g & kept) == 1, g
    assert {"exact", "phash"} <= set(dups["method"])
    # the tiny 64x64 RGB copies were matched by pixels to the 1024-px originals, which are kept (largest)
    tiny = dups[dups["source"] == "nih14-tiny64"]
    assert sorted(Path(p).name for p in tiny["path"]) == ["00000116_009.png", "00000180_002.png"]
    assert (tiny["kept_source"] == "nih14-fullres").all() and (tiny["method"] == "phash").all()
    assert (dups.loc[dups["method"] == "exact", "phash_distance"] == 0).all()


def test_excluded_patients_and_filters(run, corpus):
    res, out = run
    man = read_manifest(out / "manifest.csv")
    pats = set(man.df["patient_id"])
    for ns, p in corpus.excluded:
        assert f"{ns}:{p}" not in pats
    filtered = pd.read_csv(out / "filtered.csv", dtype=str)
    excl = filtered[filtered["rule"] == "excluded_patient"]
    # every image of patient 1529 (two in nih14-fullres) and the listed Kermany patient
    assert set(excl["patient_id"]) == {f"{ns}:{p}" for ns, p in corpus.excluded}
    assert (filtered["path"] == corpus.blank).sum() == 1
    assert filtered.loc[filtered["path"] == corpus.blank, "rule"].item() == "blank"
    q = pd.read_csv(out / "quarantine.csv")
    assert q["path"].tolist() == [corpus.corrupt] and corpus.corrupt in q["reason"].item()
    assert res.n_quarantined == 1


def test_manifest_is_readable_with_real_cached_paths(run, corpus):
    res, out = run
    man = read_manifest(out / "manifest.csv", check_paths=True)
    assert len(man) == res.n_kept and man.label_columns == []
    assert man.df["path"].str.startswith("cache/").all()
    for p, w, h, ow, oh in zip(man.paths(), man.df["width"], man.df["height"], man.df["orig_width"],
                               man.df["orig_height"]):
        with Image.open(p) as im:
            assert im.size == (w, h) and im.mode == "L"
        assert min(w, h) == min(64, min(ow, oh))  # shorter side -> 64, never upscaled
        assert abs(w / h - ow / oh) < 0.05  # aspect preserved
    # the pixels are the decoded originals, resized
    row = man.df[man.df["source"] == "nih14"].iloc[0]
    cached = read_image(out / row["path"]).pixels
    orig = read_image(row["source_path"]).pixels
    small = np.asarray(Image.fromarray(orig).resize(cached.shape[::-1], Image.Resampling.BOX))
    assert np.corrcoef(cached.ravel(), small.ravel())[0, 1] > 0.99


def test_report_files(run):
    res, out = run
    for f in ("report.md", "report.html", "summary.json", "config.yaml", "metrics.jsonl",
              "figures/sizes.png", "figures/samples.png", "figures/duplicate_pairs.png"):
        assert (out / f).is_file(), f
    md = (out / "report.md").read_text()
    assert "| nih14-tiny64 |" in md and "dup:phash" in md and "pre:excluded_patient" in md
    with Image.open(out / "figures/duplicate_pairs.png") as im:
        assert im.width > 300 and im.height > 150
