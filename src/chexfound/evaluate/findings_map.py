"""Match finding names across datasets (for out-of-distribution tests and box files).

Names differ by spelling (`Pleural_Thickening`, `PNEUMONIA`), by dataset vocabulary (NIH `Effusion` vs
CheXpert `Pleural Effusion`) and between label and box files (NIH boxes say `Infiltrate`). We compare a
canonical form (lower case, `_`/`-` as spaces, collapsed spaces) after applying a small explicit synonym
table; anything not in the table must match exactly in canonical form. The table only lists equivalences
that hold clinically as used by the public datasets (no broadening like Mass -> Lung Lesion).
"""

from __future__ import annotations

import re
from typing import Sequence

# canonical synonym -> canonical target
SYNONYMS: dict[str, str] = {
    "effusion": "pleural effusion",
    "infiltrate": "infiltration",
    "pleural thickening": "pleural thickening",
    "pleural thicken": "pleural thickening",
    "enlarged cardiac silhouette": "cardiomegaly",
    "pneumonia": "pneumonia",
    "pnuemonia": "pneumonia",
    "pneumothorax": "pneumothorax",
    "nodule/mass": "nodule/mass",
    "no finding": "no finding",
    "normal": "no finding",
    "aortic enlargement": "aortic enlargement",
    "ild": "interstitial lung disease",
    "tb": "tuberculosis",
}


def canonical(name: str) -> str:
    s = re.sub(r"[_\-]+", " ", str(name)).strip().lower()
    s = re.sub(r"\s+", " ", s)
    return SYNONYMS.get(s, s)


def map_findings(source: Sequence[str], target: Sequence[str]) -> dict[str, str]:
    """{source name: target name} for every source finding with a canonical match in `target`."""
    by_canon: dict[str, str] = {}
    for t in target:
        by_canon.setdefault(canonical(t), t)
    return {s: by_canon[canonical(s)] for s in source if canonical(s) in by_canon}


def rename_to(names: Sequence[str], vocabulary: Sequence[str]) -> dict[str, str]:
    """Rename map for names that match a vocabulary entry under another spelling (e.g. box files)."""
    m = map_findings(names, vocabulary)
    return {k: v for k, v in m.items() if k != v}
