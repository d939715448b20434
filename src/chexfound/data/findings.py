"""Canonical finding vocabularies (torchxrayvision-style: one list each, exact names and order) and a
mapping between vocabularies.

Names are kept exactly as each source writes them (NIH "Effusion" and "Pleural_Thickening", VinDr
"Pleural effusion", PadChest lower case); `finding_map` / `map_labels` relate them through spelling
normalisation plus a small table of true synonyms.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

# CXR-LT 2024 task 1, in the exact logit order of the released GLoRI head (indices 0-39).
CXRLT24: tuple[str, ...] = (
    "Adenopathy", "Atelectasis", "Azygos Lobe", "Calcification of the Aorta", "Cardiomegaly",
    "Clavicle Fracture", "Consolidation", "Edema", "Emphysema", "Enlarged Cardiomediastinum",
    "Fibrosis", "Fissure", "Fracture", "Granuloma", "Hernia",
    "Hydropneumothorax", "Infarction", "Infiltration", "Kyphosis", "Lobar Atelectasis",
    "Lung Lesion", "Lung Opacity", "Mass", "Nodule", "Normal",
    "Pleural Effusion", "Pleural Other", "Pleural Thickening", "Pneumomediastinum", "Pneumonia",
    "Pneumoperitoneum", "Pneumothorax", "Pulmonary Embolism", "Pulmonary Hypertension", "Rib Fracture",
    "Round(ed) Atelectasis", "Subcutaneous Emphysema", "Support Devices", "Tortuous Aorta", "Tuberculosis",
)

# NIH ChestX-ray14 (Wang et al. 2017), spelled as in Data_Entry_2017 "Finding Labels" (note the underscore
# in Pleural_Thickening), in the paper's order.
NIH14: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)

# CheXpert 14 observations (Irvin et al. 2019), train.csv column order.
CHEXPERT14: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)

# The 5 CheXpert competition findings.
CHEXPERT5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

# MIMIC-CXR-JPG's mimic-cxr-2.0.0-chexpert.csv: the same 14 observations, alphabetical column order.
MIMIC_CHEXPERT14: tuple[str, ...] = tuple(sorted(CHEXPERT14))

# VinDr-CXR image-level labels (22 local + 6 global), image_labels_train.csv column order.
VINDR_CXR: tuple[str, ...] = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
    "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
    "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening",
    "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia",
    "Tuberculosis", "Other diseases", "No finding",
)

VOCABULARIES: dict[str, tuple[str, ...]] = {
    "cxrlt24": CXRLT24, "nih14": NIH14, "chexpert14": CHEXPERT14, "chexpert5": CHEXPERT5,
    "mimic": MIMIC_CHEXPERT14, "vindr": VINDR_CXR,
}

# True synonyms across datasets (after spelling normalisation). Each group names one finding; the first
# entry is only for documentation. Deliberately conservative: broader/narrower terms (e.g. VinDr
# "Calcification" vs "Calcification of the Aorta", "Nodule/Mass") are not merged.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("Pleural Effusion", "Effusion"),
    ("Pleural Thickening", "Pleural_Thickening"),
    ("Infiltration", "Infiltrate", "Infiltrates"),  # NIH boxes write "Infiltrate"; PadChest "infiltrates"
    ("No Finding", "Normal"),  # CXR-LT 2024 renamed CXR-LT 2023's "No Finding" to "Normal"
    ("Fibrosis", "Pulmonary fibrosis"),
    ("Edema", "Pulmonary edema"),
    ("Granuloma", "Calcified granuloma"),
    ("Round(ed) Atelectasis", "Round atelectasis", "Rounded atelectasis"),
    ("Hernia", "Hiatal hernia"),
    ("Pneumoperitoneum", "Pneumoperitoneo"),
)


def normalise_name(name: str) -> str:
    """Spelling-insensitive key: lower case, '_'/'-' as spaces, single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", str(name))).strip().lower()


_GROUP_OF: dict[str, int] = {normalise_name(n): i for i, g in enumerate(SYNONYMS) for n in g}


def _key(name: str) -> str | int:
    k = normalise_name(name)
    return _GROUP_OF.get(k, k)


def finding_map(source: Iterable[str], target: Sequence[str]) -> dict[str, str]:
    """{source name: target name} for every source finding that has an equivalent in `target`.

    >>> finding_map(["Effusion", "Pleural_Thickening", "Infiltrate", "Hernia"], CXRLT24)["Effusion"]
    'Pleural Effusion'
    """
    by_key: dict[str | int, str] = {}
    for t in target:
        by_key.setdefault(_key(t), t)
    return {s: by_key[_key(s)] for s in source if _key(s) in by_key}


def rename_finding(name: str, target: Sequence[str]) -> str | None:
    """The name `name` has in the `target` vocabulary, or None."""
    return finding_map([name], target).get(name)


def map_labels(y: np.ndarray, source: Sequence[str], target: Sequence[str]) -> np.ndarray:
    """Re-express a label matrix [N, len(source)] in the `target` vocabulary -> float32 [N, len(target)].

    Target columns with no source equivalent are NaN (not labelled). When several source columns map to
    one target (e.g. "Effusion" and "Pleural Effusion"), a positive anywhere wins, then uncertain (-1), then
    negative; NaN only when all are NaN.
    """
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 2 or y.shape[1] != len(source):
        raise ValueError(f"labels have shape {y.shape}, expected [N, {len(source)}]")
    fmap = finding_map(source, target)
    out = np.full((y.shape[0], len(target)), np.nan, dtype=np.float32)
    col = {t: j for j, t in enumerate(target)}
    for i, s in enumerate(source):
        if s not in fmap:
            continue
        j = col[fmap[s]]
        cur, new = out[:, j], y[:, i]
        out[:, j] = _combine(cur, new)
    return out


def _combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    rank = {1.0: 3, -1.0: 2, 0.0: 1}

    def r(v: np.ndarray) -> np.ndarray:
        out = np.zeros(v.shape, np.int8)
        for val, k in rank.items():
            out[v == val] = k
        return out

    ra, rb = r(a), r(b)
    return np.where(rb > ra, b, a).astype(np.float32)


def unmapped(source: Iterable[str], target: Sequence[str]) -> list[str]:
    """Source findings without an equivalent in `target` (to report what a mapping drops)."""
    src = list(source)
    fmap = finding_map(src, target)
    return [s for s in src if s not in fmap]


def vocabulary(name: str) -> tuple[str, ...]:
    try:
        return VOCABULARIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown vocabulary {name!r}; known: {sorted(VOCABULARIES)}") from None


__all__ = [
    "CHEXPERT14", "CHEXPERT5", "CXRLT24", "MIMIC_CHEXPERT14", "NIH14", "SYNONYMS", "VINDR_CXR", "VOCABULARIES",
    "finding_map", "map_labels", "normalise_name", "rename_finding", "unmapped", "vocabulary",
]
