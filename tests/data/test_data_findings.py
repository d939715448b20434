"""Finding vocabularies and the mapping between them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from chexfound.data import findings as F


def test_cxrlt24_matches_reference_order(data_root: Path) -> None:
    ref = (data_root.parent / "reference" / "chexfound.md")
    text = ref.read_text() if ref.is_file() else ""
    listed = re.findall(r"(\d+) ([A-Z][^,\n]*?)(?:,|\.\n)", text.split("exact column/logit order")[1][:1500]) \
        if "exact column/logit order" in text else []
    assert len(F.CXRLT24) == 40 and len(set(F.CXRLT24)) == 40
    if ref.is_file():  # the reference notes list "0 Adenopathy, 1 Atelectasis, ..."
        assert len(listed) >= 40, "could not find the 40 findings in the reference notes"
        assert [name for _, name in listed[:40]] == list(F.CXRLT24)
        assert [int(i) for i, _ in listed[:40]] == list(range(40))
    assert F.CXRLT24[0] == "Adenopathy" and F.CXRLT24[24] == "Normal" and F.CXRLT24[39] == "Tuberculosis"
    assert list(F.CXRLT24) == sorted(F.CXRLT24)  # the release is alphabetical


def test_nih14_names_as_nih_writes_them(data_root: Path) -> None:
    cols = pd.read_csv(data_root / "nih14" / "labels.csv", nrows=1).columns
    assert set(F.NIH14) <= set(cols)  # the shared NIH files use NIH's spelling
    assert "Pleural_Thickening" in F.NIH14 and "Effusion" in F.NIH14 and len(F.NIH14) == 14


def test_nih_to_cxrlt_mapping() -> None:
    m = F.finding_map(F.NIH14, F.CXRLT24)
    assert m["Effusion"] == "Pleural Effusion"
    assert m["Pleural_Thickening"] == "Pleural Thickening"
    assert m["Infiltration"] == "Infiltration" and m["Hernia"] == "Hernia"
    assert len(m) == 14  # every NIH finding exists in CXR-LT 2024
    assert F.rename_finding("Infiltrate", F.CXRLT24) == "Infiltration"  # NIH's box file spelling
    assert F.finding_map(F.CHEXPERT14, F.CXRLT24)["No Finding"] == "Normal"
    assert F.unmapped(F.VINDR_CXR, F.CXRLT24)[:2] == ["Aortic enlargement", "Calcification"]
    assert F.finding_map(["pleural effusion", "cardiomegaly", "infiltrates"], F.CXRLT24) == {
        "pleural effusion": "Pleural Effusion", "cardiomegaly": "Cardiomegaly", "infiltrates": "Infiltration"}


def test_map_labels_combines_and_marks_unlabelled() -> None:
    source = ["Effusion", "Pleural Effusion", "Nodule", "Aortic enlargement"]
    y = np.array([[0, 1, 0, 1], [-1, 0, np.nan, 0], [np.nan, np.nan, 1, 0]], np.float32)
    out = F.map_labels(y, source, F.CXRLT24)
    j = F.CXRLT24.index
    assert out.shape == (3, 40)
    assert out[0, j("Pleural Effusion")] == 1  # positive wins
    assert out[1, j("Pleural Effusion")] == -1  # uncertain beats negative
    assert np.isnan(out[2, j("Pleural Effusion")])
    assert out[2, j("Nodule")] == 1 and np.isnan(out[1, j("Nodule")])
    assert np.isnan(out[:, j("Mass")]).all()  # no source for Mass: not labelled
