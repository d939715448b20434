"""Torch datasets over image paths/manifests that never crash a batch job on a bad file."""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from chexfound.data.manifest import Manifest, UncertainSpec
from chexfound.errors import ChexfoundError
from chexfound.io import CXRImage, read_image


class ImageDataset(Dataset):
    """Items are dicts: {"index", "path", "image" ([3,S,S] tensor), "label" (optional)} or, for a file
    that cannot be read, {"index", "path", "error"}; `collate_skip_errors` drops those and reports them."""

    def __init__(
        self,
        paths: Sequence[str | PathLike[str]],
        transform: Callable[[np.ndarray], torch.Tensor],
        labels: np.ndarray | None = None,
        reader: Callable[[Path], CXRImage] = read_image,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.labels = labels
        self.reader = reader  # e.g. functools.partial(read_image, min_size=64)
        if labels is not None and len(labels) != len(self.paths):
            raise ValueError(f"{len(labels)} label rows for {len(self.paths)} paths")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.paths[i]
        try:
            img = self.reader(p)
            x = self.transform(img.pixels)
        except (ChexfoundError, ValueError, OSError) as e:
            return {"index": i, "path": str(p), "error": str(e)}
        item: dict[str, Any] = {"index": i, "path": str(p), "image": x}
        if img.meta.get("warnings"):  # what the reader doubts about the file (e.g. its photometric header)
            item["warnings"] = list(img.meta["warnings"])
        if self.labels is not None:
            item["label"] = torch.as_tensor(self.labels[i])
        return item


def manifest_dataset(
    manifest: Manifest,
    transform: Callable[[np.ndarray], torch.Tensor],
    uncertain: UncertainSpec = "nan",
    with_labels: bool = True,
    reader: Callable[[Path], CXRImage] = read_image,
) -> ImageDataset:
    """An ImageDataset over a manifest's images, with its labels (NaN = not labelled) resolved by the
    `uncertain` policy."""
    labels = manifest.labels(uncertain) if with_labels and manifest.label_columns else None
    return ImageDataset(manifest.paths(), transform, labels, reader=reader)


def collate_skip_errors(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack good items; bad ones go to batch["errors"] as (index, path, reason)."""
    good = [it for it in items if "error" not in it]
    out: dict[str, Any] = {
        "errors": [(it["index"], it["path"], it["error"]) for it in items if "error" in it],
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "path": [it["path"] for it in good],
        "warnings": {it["index"]: it["warnings"] for it in good if it.get("warnings")},
    }
    if good:
        out["image"] = torch.stack([it["image"] for it in good])
        if "label" in good[0]:
            out["label"] = torch.stack([it["label"] for it in good])
    return out
