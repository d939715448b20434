"""The kept copy of a duplicate group follows the stated quality order (curate/keep.py), on the real
NEMA WG04 image stored three ways: JPEG 2000 lossy (RG1_J2KI), JPEG 2000 lossless (RG1_J2KR) and
uncompressed (RG1_UNCR); the last two decode to identical pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from chexfound.curate.keep import grey_bits, keep_rank
from chexfound.curate.pipeline import run_curation
from chexfound.curate.spec import load_spec
from chexfound.io import read_image


def _table(**cols) -> pd.DataFrame:
    n = len(next(iter(cols.values())))
    base = {"orig_width": [100] * n, "orig_height": [100] * n, "lossy": [False] * n, "grey_bits": [8] * n,
            "source_index": [0] * n, "rel_path": [f"{k}.png" for k in range(n)]}
    base.update(cols)
    return pd.DataFrame(base)


def test_quality_order_lossless_then_pixels_then_grey_levels_then_source_then_path():
    t = _table(lossy=[True, False, False, False, False, None],
               orig_width=[4000, 1000, 1000, 1000, 1000, 4000],
               grey_bits=[16, 8, 12, 12, 12, 16],
               source_index=[0, 0, 1, 0, 0, 0],
               rel_path=["a", "b", "c", "e", "d", "f"])
    # lossy 4000-px copy last; unknown compression after every lossless copy; among lossless: 12 bits
    # before 8, source 0 before 1, then the path (d before e)
    assert np.argsort(keep_rank(t, "quality")).tolist() == [4, 3, 2, 1, 5, 0]
    assert np.argsort(keep_rank(t, "largest")).tolist()[:2] == [5, 0]  # pixels first: the 4000-px copies
    assert np.argsort(keep_rank(t, "source_order")).tolist()[-1] == 2  # the only source-1 copy last


def test_grey_bits_counts_levels_not_the_container():
    ramp8 = np.repeat(np.arange(256, dtype=np.float32) / 255.0, 4).reshape(32, 32)
    as16 = (np.round(ramp8 * 255).astype(np.uint16) * 257).astype(np.float32) / 65535.0  # 16-bit re-encode
    assert grey_bits(ramp8) == grey_bits(as16) == 8
    assert grey_bits(np.linspace(0, 1, 4096, dtype=np.float32).reshape(64, 64)) == 12


@pytest.mark.timeout(180)
def test_three_encodings_keep_the_lossless_one_and_point_at_it(data_root: Path, tmp_path: Path) -> None:
    d = data_root / "dicom"
    files = ["RG1_J2KI.dcm", "RG1_UNCR.dcm", "RG1_J2KR.dcm"]  # the lossy copy listed first
    assert read_image(d / "RG1_J2KI.dcm").meta["lossy"] is True
    assert read_image(d / "RG1_J2KR.dcm").meta["lossy"] is False
    pd.DataFrame({"path": files, "patient_id": ["rg1"] * 3}).to_csv(tmp_path / "rg1.csv", index=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "sources": [{"name": "nema", "root": str(d), "format": "manifest", "manifest": str(tmp_path / "rg1.csv")}],
        "cache": {"size": 64}, "report": {"samples": 2, "pairs": 2}}))
    res = run_curation(load_spec(spec), tmp_path / "out", progress=False)
    assert res.n_kept == 1 and res.n_duplicates == 2
    kept = pd.read_csv(tmp_path / "out" / "manifest.csv")["source_path"].tolist()
    assert kept == [str(d / "RG1_J2KR.dcm")]  # lossless; same pixels as UNCR, so the path decides
    dups = pd.read_csv(tmp_path / "out" / "duplicates.csv").set_index("path")
    assert set(dups["kept_path"]) == {str(d / "RG1_J2KR.dcm")}  # every removed row names the kept file
    assert dups.loc[str(d / "RG1_UNCR.dcm"), "method"] == "exact"
    assert dups.loc[str(d / "RG1_J2KI.dcm"), "quality"].startswith("lossy")
    assert dups.loc[str(d / "RG1_J2KI.dcm"), "kept_quality"].startswith("lossless")
