"""Turn public datasets' own label files/layouts into manifests.

Each reader takes the dataset's root folder and returns a `Manifest` (paths relative to its root, labels
1/0/-1/NaN). `READERS` maps the `chexfound manifest --format` names to them.
"""

from __future__ import annotations

from typing import Any, Callable

from chexfound.data.manifest import Manifest
from chexfound.data.readers.chexpert import read_chexpert
from chexfound.data.readers.cxrlt import read_cxrlt24
from chexfound.data.readers.folder import KERMANY_PATIENT_REGEX, read_folder, read_kermany
from chexfound.data.readers.mimic import mimic_image_path, read_mimic
from chexfound.data.readers.nih14 import read_nih14, read_nih14_boxes, read_nih14_shared
from chexfound.data.readers.padchest import parse_labels, read_padchest
from chexfound.data.readers.vindr import read_vindr

READERS: dict[str, Callable[..., Manifest]] = {
    "nih14": read_nih14,
    "nih14-shared": read_nih14_shared,
    "chexpert": read_chexpert,
    "mimic": read_mimic,
    "cxrlt24": read_cxrlt24,
    "vindr": read_vindr,
    "padchest": read_padchest,
    "folder": read_folder,
    "kermany": read_kermany,
}


def build_manifest(fmt: str, root: Any, **options: Any) -> Manifest:
    try:
        reader = READERS[fmt]
    except KeyError:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {sorted(READERS)}") from None
    return reader(root, **options)


__all__ = [
    "KERMANY_PATIENT_REGEX", "READERS", "build_manifest", "mimic_image_path", "parse_labels", "read_chexpert",
    "read_cxrlt24", "read_folder", "read_kermany", "read_mimic", "read_nih14", "read_nih14_boxes",
    "read_nih14_shared", "read_padchest", "read_vindr",
]
