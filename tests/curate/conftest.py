"""A small mixed corpus over the real data: subsets of the NIH folders and Kermany (subset manifests
pointing into the shared folders) plus a folder source of derived copies we control."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

NIH_DUP_IDS = ("00000116_009.png", "00000180_002.png")  # in nih14-fullres and nih14-tiny64


@dataclass
class Corpus:
    dir: Path
    spec: Path
    exclude: Path
    excluded: set[tuple[str, str]]  # (namespace, patient) removed by the exclude list
    extra_exact: str  # folder-source file that is an exact (16-bit re-encode) copy of a fullres image
    extra_near: str  # folder-source file that is a JPEG/gamma/aspect-changed copy of an nih14 image
    extra_near_of: str  # the nih14 file it was made from
    corrupt: str
    blank: str
    n_listed: int


def _subset(data: Path, name: str, out: Path, rows: pd.DataFrame) -> Path:
    p = out / f"{name}.csv"
    rows.to_csv(p, index=False)
    return p


def build_corpus(data: Path, out: Path, cache: dict | None = None) -> Corpus:
    out.mkdir(parents=True, exist_ok=True)
    nih = pd.read_csv(data / "nih14/labels.csv", dtype=str)
    full = pd.read_csv(data / "nih14-fullres/labels.csv", dtype=str)
    tiny = pd.read_csv(data / "nih14-tiny64/labels.csv", dtype=str)
    ker = pd.read_csv(data / "kermany/labels.csv", dtype=str)
    full_sub = full[full["image_id"].isin([*NIH_DUP_IDS, "00001529_003.png", "00001529_005.png", "00000372_012.png"])]
    # tiny64: the two copies of fullres images plus follow-ups of one patient (similar, but not duplicates)
    tiny_sub = pd.concat([tiny[tiny["image_id"].isin(NIH_DUP_IDS)], tiny[tiny["patient_id"] == "13"].head(6)])
    nih_sub = nih.head(6)
    ker_sub = ker[ker["path"].str.contains("person1481_bacteria_386[2-5]|NORMAL2-IM-009[56]-")]
    ker_sub = pd.concat([ker_sub, ker[ker["split"] == "test"].head(4)]).drop_duplicates("path")

    extra = out / "extra"
    extra.mkdir(exist_ok=True)
    # exact copy: a 16-bit re-encode of an 8-bit fullres image decodes to the very same [0,1] pixels
    src8 = np.asarray(Image.open(data / "nih14-fullres/images/00000180_002.png").convert("L"))
    Image.fromarray(src8.astype(np.uint16) * 257).save(extra / "00000180_900.png")
    # near copy: JPEG q=60, gamma 0.8, squashed to 400x300
    near_of = str(data / "nih14" / nih_sub["path"].iloc[0])
    g = np.asarray(Image.open(near_of).convert("L"), dtype=np.float64) / 255.0
    im = Image.fromarray(np.rint((g ** 0.8) * 255).astype(np.uint8)).resize((400, 300), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=60)
    (extra / "00009999_000.jpg").write_bytes(buf.getvalue())
    Image.fromarray(np.full((300, 300), 77, np.uint8)).save(extra / "00008888_000.png")  # blank
    (extra / "00007777_000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)  # corrupt

    man = {n: _subset(data, n, out, df) for n, df in
           (("nih14", nih_sub), ("nih14-fullres", full_sub), ("nih14-tiny64", tiny_sub), ("kermany", ker_sub))}
    spec = {
        "sources": [
            {"name": "nih14", "root": str(data / "nih14"), "format": "manifest", "manifest": str(man["nih14"]),
             "patient_column": "patient_id", "patient_namespace": "nih"},
            {"name": "nih14-fullres", "root": str(data / "nih14-fullres"), "format": "manifest",
             "manifest": str(man["nih14-fullres"]), "patient_namespace": "nih"},
            {"name": "nih14-tiny64", "root": str(data / "nih14-tiny64"), "format": "manifest",
             "manifest": str(man["nih14-tiny64"]), "patient_namespace": "nih"},
            {"name": "kermany", "root": str(data / "kermany"), "format": "manifest", "manifest": str(man["kermany"]),
             "patient_column": "patient_key"},
            {"name": "extra", "root": str(extra), "format": "folder", "patient_regex": r"^(\d+)_"},
        ],
        "cache": {"size": 64, **(cache or {})},
        "report": {"samples": 8, "pairs": 4},
    }
    spec_path = out / "corpus.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    excl_patient = ker_sub["patient_key"].iloc[-1]
    excl = out / "exclude.csv"
    pd.DataFrame({"source": ["nih", "kermany"], "patient_id": ["00001529", excl_patient]}).to_csv(excl, index=False)
    n = len(nih_sub) + len(full_sub) + len(tiny_sub) + len(ker_sub) + 4
    return Corpus(out, spec_path, excl, {("nih", "1529"), ("kermany", excl_patient)},
                  str(extra / "00000180_900.png"), str(extra / "00009999_000.jpg"), near_of,
                  str(extra / "00007777_000.png"), str(extra / "00008888_000.png"), n)


@pytest.fixture(scope="session")
def corpus(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(data_root, tmp_path_factory.mktemp("corpus"))
