"""docs/examples/corpus.yaml, the documented example of the `curate --spec` format: it loads, names every
section and key the format has, points at folders the shared data really has, and curates."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from chexfound.curate.pipeline import run_curation
from chexfound.curate.spec import CacheSpec, DedupSpec, FilterSpec, ReportSpec, spec_from_dict

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "corpus.yaml"
SHARED = "../shared/data"


def _on_shared_data(data_root: Path) -> dict:
    d = yaml.safe_load(EXAMPLE.read_text())
    for s in d["sources"]:
        assert s["root"].startswith(SHARED + "/"), s["root"]
        s["root"] = str(data_root / s["root"][len(SHARED) + 1:])
    return d


def test_example_documents_every_key() -> None:
    d = yaml.safe_load(EXAMPLE.read_text())
    text = EXAMPLE.read_text()
    for section, cls in (("filters", FilterSpec), ("dedup", DedupSpec), ("cache", CacheSpec), ("report", ReportSpec)):
        assert set(d[section]) == {f.name for f in fields(cls)}, section
    formats = {s["format"] for s in d["sources"]}
    assert {"manifest", "folder"} <= formats and formats - {"manifest", "folder"}  # and a dataset reader
    for key in ("patient_regex", "limit", "view_column", "age_column", "modality_column"):
        assert key in text, key


@pytest.mark.timeout(180)
def test_example_loads_and_curates_on_the_shared_data(data_root: Path, tmp_path: Path) -> None:
    d = _on_shared_data(data_root)
    for s in d["sources"]:
        assert Path(s["root"]).is_dir(), s["root"]
        s["limit"] = 2  # a couple of images per source keeps this quick
    d["cache"]["size"] = 64
    spec = spec_from_dict(d, tmp_path / "corpus.yaml")
    assert spec.dedup.keep == "quality" and [s.name for s in spec.sources] == ["nih14", "nih14-fullres",
                                                                               "kermany", "dicom"]
    res = run_curation(spec, tmp_path / "out", progress=False)
    assert res.complete and res.n_items == 8 and res.n_kept >= 4
    assert (tmp_path / "out" / "manifest.csv").is_file() and (tmp_path / "out" / "report.html").is_file()
