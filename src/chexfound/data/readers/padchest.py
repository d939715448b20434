"""PadChest (Bustos et al. 2020; BIMCV): `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`.

Columns used: ImageID (file name), ImageDir (zip folder number), StudyID, PatientID, Projection
(PA/L/AP/AP_horizontal/COSTAL...), PatientSex_DICOM, MethodLabel (Physician / RNN_model) and Labels, a
Python-list string of lower-case findings such as "['pleural effusion', 'cardiomegaly']" ("['normal']"
for normals). Images: <ImageDir>/<ImageID> (16-bit PNG) or one flat folder.
"""

from __future__ import annotations

import ast
from collections import Counter
from os import PathLike
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from chexfound.data.manifest import Manifest
from chexfound.data.readers._common import MissingPolicy, apply_missing, index_images, make_manifest, read_csv
from chexfound.errors import ManifestError

_CSV_PATTERNS = ("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", "PADCHEST_chest_x_ray_images_labels_160K.csv")


def parse_labels(value: object) -> list[str] | None:
    """"['a', ' b']" -> ['a', 'b']; NaN/unparsable -> None (not labelled)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    try:
        v = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return None
    if not isinstance(v, (list, tuple)):
        return None
    return [s for s in (str(x).strip().lower() for x in v) if s]


def _find_csv(root: Path) -> Path:
    for n in _CSV_PATTERNS:
        for cand in (root / n, root / f"{n}.gz"):
            if cand.is_file():
                return cand
    hits = sorted(root.glob("PADCHEST*.csv*"))
    if hits:
        return hits[0]
    raise ManifestError(root, "PadChest label file not found (PADCHEST_chest_x_ray_images_labels_160K*.csv[.gz])")


def read_padchest(
    root: str | PathLike[str],
    labels: Sequence[str] | None = None,
    min_count: int = 1,
    missing: MissingPolicy = "drop",
) -> Manifest:
    """Manifest of PadChest: one 1/0 column per finding (`labels`, or every finding with at least
    `min_count` images), NaN for images without labels."""
    root = Path(root)
    f = _find_csv(root)
    raw = read_csv(f, required=["ImageID", "PatientID", "Labels"], dtype={"ImageDir": str, "PatientID": str,
                                                                         "StudyID": str})
    parsed = raw["Labels"].map(parse_labels)
    if labels is None:
        counts = Counter(x for ls in parsed if ls for x in set(ls))
        labels = sorted(k for k, n in counts.items() if n >= min_count)
    labels = [str(x).strip().lower() for x in labels]
    index = index_images(root, (".png",))
    if not index:
        raise ManifestError(root, "no PNG images found under the PadChest root")

    def locate(image_id: str, image_dir: object) -> str:
        if isinstance(image_dir, str) and image_dir and (root / image_dir / image_id).is_file():
            return f"{image_dir}/{image_id}"
        return str(index.get(image_id, Path(str(image_dir)) / image_id if isinstance(image_dir, str) else image_id))

    dirs = raw["ImageDir"] if "ImageDir" in raw.columns else pd.Series([None] * len(raw))
    df = pd.DataFrame({
        "path": [locate(str(i), d) for i, d in zip(raw["ImageID"], dirs)],
        "patient_id": raw["PatientID"].astype(str),
        "image_id": raw["ImageID"].astype(str),
        "study_id": raw.get("StudyID", pd.Series([None] * len(raw))),
        "view": raw.get("Projection", raw.get("ViewPosition_DICOM", pd.Series([None] * len(raw)))),
        "sex": raw.get("PatientSex_DICOM", pd.Series([None] * len(raw))),
        "label_method": raw.get("MethodLabel", pd.Series([None] * len(raw))),
    })
    y = np.full((len(df), len(labels)), np.nan, np.float32)
    col = {n: j for j, n in enumerate(labels)}
    for i, ls in enumerate(parsed):
        if ls is None:
            continue
        y[i] = 0.0
        for x in ls:
            if x in col:
                y[i, col[x]] = 1.0
    label_frame = pd.DataFrame(y, columns=labels)
    df = pd.concat([df, label_frame], axis=1)
    df = apply_missing(df, root, missing, f)
    return make_manifest(df, root, labels, f)
