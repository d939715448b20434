"""Frozen-backbone image features for the evaluation protocols (CLS of the last n blocks + mean patch).

The protocols train many small heads on the same frozen features, so features are computed once per
(backbone, image list, transform, n_blocks) and kept in an .npz under the run folder; a rerun with the same
--out reuses them. Unreadable images are skipped and listed (never crash the batch).

For heads that need the patch tokens (GLoRI) the adapt stage's feature cache is the source instead; this
module keeps the pooled vectors a linear/logistic probe needs, which stay small even for 100k+ images.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from chexfound.data.datasets import ImageDataset, collate_skip_errors
from chexfound.data.transform import InputTransform
from chexfound.models.format import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    cls: np.ndarray          # [N, n_blocks, D] float32 (zeros for unreadable images)
    patch_mean: np.ndarray   # [N, D] mean of last-block patch tokens
    ok: np.ndarray           # [N] bool: image was read
    errors: list[tuple[int, str, str]] = field(default_factory=list)

    def vectors(self, n_blocks: int | None = None, avgpool: bool = False) -> np.ndarray:
        """[N, n*D (+D)]: the linear-probe input (CLS of the last n blocks, optionally + mean patch)."""
        c = self.cls if n_blocks is None else self.cls[:, -n_blocks:]
        x = c.reshape(c.shape[0], -1)
        return np.concatenate([x, self.patch_mean], axis=1) if avgpool else x


def _key(backbone_sha: str, paths: Sequence[Path], transform: InputTransform, n_blocks: int) -> str:
    h = hashlib.sha256()
    h.update(backbone_sha.encode())
    h.update(json.dumps(transform.to_dict(), sort_keys=True).encode())
    h.update(str(n_blocks).encode())
    for p in paths:
        h.update(str(p).encode() + b"\0")
    return h.hexdigest()[:20]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    paths: Sequence[str | PathLike[str]],
    transform: InputTransform,
    n_blocks: int,
    backbone_sha: str,
    cache_dir: str | PathLike[str] | None = None,
    batch_size: int = 32,
    workers: int = 0,
    device: str | None = None,
    dtype: str = "fp32",
    progress: bool = False,
) -> FeatureSet:
    paths = [Path(p) for p in paths]
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"features-{_key(backbone_sha, paths, transform, n_blocks)}.npz"
        if cache.is_file():
            z = np.load(cache, allow_pickle=False)
            errs = json.loads(str(z["errors"]))
            log.info("reusing features %s", cache)
            return FeatureSet(z["cls"], z["patch_mean"], z["ok"], [tuple(e) for e in errs])
    dev = resolve_device(device)
    model = backbone.to(dev).eval()
    depth = len(model.blocks)
    n = min(n_blocks, depth)
    d = model.embed_dim if hasattr(model, "embed_dim") else model.cfg.embed_dim
    cls = np.zeros((len(paths), n, d), dtype=np.float32)
    pm = np.zeros((len(paths), d), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    errors: list[tuple[int, str, str]] = []
    loader = DataLoader(ImageDataset(paths, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_skip_errors)
    autocast = dev.type == "cuda" and dtype == "bf16"
    it: Any = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="features", unit="batch")
    for batch in it:
        errors += batch["errors"]
        if "image" not in batch:
            continue
        x = batch["image"].to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            out = model.get_intermediate_layers(x, n, return_class_token=True)
        idx = batch["index"].numpy()
        cls[idx] = torch.stack([c for _, c in out], dim=1).float().cpu().numpy()
        pm[idx] = out[-1][0].float().mean(dim=1).cpu().numpy()
        ok[idx] = True
    fs = FeatureSet(cls, pm, ok, errors)
    if cache is not None:
        buf = io.BytesIO()
        np.savez(buf, cls=cls, patch_mean=pm, ok=ok, errors=np.array(json.dumps(errors)))
        atomic_write_bytes(cache, buf.getvalue())
    return fs
