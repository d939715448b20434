"""A feature cache: the frozen backbone runs once per image (and per horizontal flip, if asked) and its
`get_intermediate_layers(x, n, return_class_token=True)` output is kept on disk, memory-mapped, in float16.

Folder layout:
    cache.json          backbone sha256 + config, input transform, n_blocks, shapes, flip_tta, paths digest
    index.csv           row, id, path, status (ok / failed / pending), error
    patch.npy           float16 [N, n_blocks, P, D]   patch tokens (blocks ascending, as the backbone returns them)
    cls.npy             float16 [N, n_blocks, D]
    patch_flip.npy, cls_flip.npy   the same for the horizontally flipped image (flip_tta=True)
    status.npy          uint8 [N]: 0 pending, 1 ok, 2 unreadable

Building is resumable: rows are flushed after every batch and `status.npy` is written after the data, so an
interrupted build restarts where it stopped. Building again with the same backbone (sha256), transform,
n_blocks and paths reuses the cache; anything else is refused (use another folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from chexfound.adapt.heads.base import Features
from chexfound.adapt.runtime import resolve_dtype
from chexfound.errors import ConfigError
from chexfound.runio import atomic_output, atomic_write_bytes, resolve_device

log = logging.getLogger(__name__)
PENDING, OK, FAILED = 0, 1, 2
_META = "cache.json"


def _paths_digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _paths_and_ids(src: Any) -> tuple[list[str], list[str]]:
    """A Manifest (its resolved paths, image_id if present) or a sequence of paths."""
    if hasattr(src, "paths") and hasattr(src, "df"):
        paths = [str(p) for p in src.paths()]
        ids = src.df["image_id"].astype(str).tolist() if "image_id" in src.df.columns else list(paths)
        return paths, ids
    paths = [str(p) for p in src]
    return paths, list(paths)


class FeatureCache:
    def __init__(self, root: Path, meta: dict[str, Any], in_memory: bool = False) -> None:
        self.root = root
        self.meta = meta
        mode = None if in_memory else "r"
        self._patch = np.load(root / "patch.npy", mmap_mode=mode)
        self._cls = np.load(root / "cls.npy", mmap_mode=mode)
        self._patch_flip = self._cls_flip = None
        if meta.get("flip_tta"):
            self._patch_flip = np.load(root / "patch_flip.npy", mmap_mode=mode)
            self._cls_flip = np.load(root / "cls_flip.npy", mmap_mode=mode)
        self._status = np.load(root / "status.npy")
        self._index = pd.read_csv(root / "index.csv", keep_default_na=False)

    # -- opening / building --
    @classmethod
    def open(cls, root: str | PathLike[str], in_memory: bool = False) -> "FeatureCache":
        r = Path(root)
        if not (r / _META).is_file():
            raise ConfigError(r, "not a feature cache (no cache.json)")
        meta = json.loads((r / _META).read_text())
        cache = cls(r, meta, in_memory)
        pending = int((cache._status == PENDING).sum())
        if pending:
            log.warning("%s: %d of %d rows were never computed (interrupted build); they are marked invalid",
                        r, pending, len(cache))
        return cache

    @classmethod
    def build(
        cls,
        backbone: torch.nn.Module,
        paths_or_manifest: Any,
        out_dir: str | PathLike[str],
        n_blocks: int = 4,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        transform: Any = None,
        flip_tta: bool = False,
        workers: int = 0,
        backbone_sha256: str | None = None,
        progress: bool = False,
    ) -> "FeatureCache":
        from chexfound.data.transform import InputTransform
        from chexfound.models import backbone_sha256 as sha_of

        root = Path(out_dir)
        paths, ids = _paths_and_ids(paths_or_manifest)
        if not paths:
            raise ConfigError(root, "no images to cache")
        tf = transform if transform is not None else InputTransform.for_backbone(backbone.cfg)
        tf_dict = tf.to_dict() if hasattr(tf, "to_dict") else {"callable": repr(tf)}
        sha = backbone_sha256 or sha_of(backbone)
        depth = len(backbone.blocks)
        if not 1 <= n_blocks <= depth:
            raise ConfigError(root, f"n_blocks={n_blocks} but the backbone has {depth} blocks")
        size = int(tf_dict.get("size", backbone.cfg.img_size))
        grid = (size // backbone.patch_size, size // backbone.patch_size)
        want = {"backbone_sha256": sha, "transform": tf_dict, "n_blocks": n_blocks, "flip_tta": bool(flip_tta),
                "paths_sha256": _paths_digest(paths), "n": len(paths)}
        if (root / _META).is_file():
            have = json.loads((root / _META).read_text())
            diff = [k for k, v in want.items() if have.get(k) != v]
            if diff:
                raise ConfigError(root, f"a feature cache for different inputs is already here ({', '.join(diff)} "
                                        "differ); use another cache folder or delete this one")
            meta = have
        else:
            p_tok, d = grid[0] * grid[1], backbone.embed_dim
            need = len(paths) * n_blocks * (p_tok + 1) * d * 2 * (2 if flip_tta else 1)
            root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(root).free
            if need > free:
                raise ConfigError(root, f"the cache needs {need / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB free")
            meta = {**want, "backbone_config": backbone.cfg.to_dict(), "num_patches": p_tok, "embed_dim": d,
                    "grid": list(grid), "dtype": "float16", "format_version": 1}
            shapes = {"patch": (len(paths), n_blocks, p_tok, d), "cls": (len(paths), n_blocks, d)}
            for name, shape in shapes.items():
                for suffix in ([""] + (["_flip"] if flip_tta else [])):
                    np.lib.format.open_memmap(root / f"{name}{suffix}.npy", mode="w+", dtype=np.float16,
                                              shape=shape).flush()
            np.save(root / "status.npy", np.zeros(len(paths), dtype=np.uint8))
            _write_index(root, paths, ids, np.zeros(len(paths), dtype=np.uint8), {})
            atomic_write_bytes(root / _META, json.dumps(meta, indent=1).encode())

        status = np.load(root / "status.npy")
        todo = np.flatnonzero(status == PENDING)
        if len(todo):
            errors = _read_errors(root)
            _compute(backbone, [paths[i] for i in todo], todo, root, tf, n_blocks, batch_size, device, dtype,
                     flip_tta, workers, status, errors, progress)
            _write_index(root, paths, ids, status, errors)
        return cls.open(root)

    # -- reading --
    def __len__(self) -> int:
        return len(self._status)

    @property
    def paths(self) -> list[str]:
        return self._index["path"].astype(str).tolist()

    @property
    def ids(self) -> list[str]:
        return self._index["id"].astype(str).tolist()

    @property
    def valid(self) -> np.ndarray:
        return self._status == OK

    @property
    def has_flip(self) -> bool:
        return self._patch_flip is not None

    @property
    def errors(self) -> list[tuple[int, str, str]]:
        """(row, path, reason) of the images that could not be read."""
        reasons = _read_errors(self.root)
        paths = self.paths
        return [(int(i), paths[i], reasons.get(int(i), "unreadable")) for i in np.flatnonzero(self._status == FAILED)]

    @property
    def n_blocks(self) -> int:
        return int(self.meta["n_blocks"])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.meta["grid"][0]), int(self.meta["grid"][1])

    @property
    def backbone_sha256(self) -> str:
        return str(self.meta["backbone_sha256"])

    def features(self, indices: Sequence[int] | np.ndarray, flip: bool = False) -> Features:
        """Rows -> tuple over blocks (ascending) of (patch [B, P, D], cls [B, D]) float32 tensors."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if flip and not self.has_flip:
            raise ValueError(f"{self.root}: cache was built without flipped features (flip_tta=False)")
        patch, cls = (self._patch_flip, self._cls_flip) if flip else (self._patch, self._cls)
        # Memory maps read fastest in row order; gather sorted, then restore the caller's order.
        order = np.argsort(idx, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        p = torch.from_numpy(np.ascontiguousarray(patch[idx[order]])[inv].astype(np.float32))
        c = torch.from_numpy(np.ascontiguousarray(cls[idx[order]])[inv].astype(np.float32))
        return tuple((p[:, b], c[:, b]) for b in range(p.shape[1]))


def _read_errors(root: Path) -> dict[int, str]:
    """Unreadable images, logged to errors.jsonl as they happen (so an interrupted build keeps them)."""
    out: dict[int, str] = {}
    f = root / "errors.jsonl"
    if f.is_file():
        for line in f.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[int(rec["row"])] = str(rec["error"])
    return out


def _write_index(root: Path, paths: list[str], ids: list[str], status: np.ndarray, errors: dict[int, str]) -> None:
    names = {PENDING: "pending", OK: "ok", FAILED: "failed"}
    df = pd.DataFrame({"row": np.arange(len(paths)), "id": ids, "path": paths,
                       "status": [names[int(s)] for s in status],
                       "error": [errors.get(i, "") for i in range(len(paths))]})
    atomic_write_bytes(root / "index.csv", df.to_csv(index=False).encode())


def _compute(backbone: torch.nn.Module, paths: list[str], rows: np.ndarray, root: Path, tf: Any, n_blocks: int,
             batch_size: int, device: Any, dtype: Any, flip_tta: bool, workers: int, status: np.ndarray,
             errors: dict[int, str], progress: bool) -> None:
    from torch.utils.data import DataLoader

    from chexfound.data.datasets import ImageDataset, collate_skip_errors

    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    was_training = backbone.training
    backbone = backbone.to(dev).eval()
    mm = {name: np.load(root / f"{name}.npy", mmap_mode="r+")
          for name in (["patch", "cls"] + (["patch_flip", "cls_flip"] if flip_tta else []))}
    loader = DataLoader(ImageDataset(paths, tf), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_skip_errors, shuffle=False)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="caching features", unit="img")
    fp16_max = float(np.finfo(np.float16).max)

    def run(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            out = backbone.get_intermediate_layers(x, n=n_blocks, return_class_token=True)
        p = torch.stack([o[0] for o in out], 1).float().clamp(-fp16_max, fp16_max)
        c = torch.stack([o[1] for o in out], 1).float().clamp(-fp16_max, fp16_max)
        return p.half().cpu().numpy(), c.half().cpu().numpy()

    try:
        with torch.inference_mode():
            for batch in loader:
                if batch["errors"]:
                    with open(root / "errors.jsonl", "a") as f:
                        for i, path, reason in batch["errors"]:
                            status[rows[i]] = FAILED
                            errors[int(rows[i])] = reason
                            f.write(json.dumps({"row": int(rows[i]), "path": path, "error": reason}) + "\n")
                            log.warning("skipping %s: %s", path, reason)
                if "image" in batch:
                    r = rows[batch["index"].numpy()]
                    x = batch["image"].to(dev)
                    mm["patch"][r], mm["cls"][r] = run(x)
                    if flip_tta:
                        mm["patch_flip"][r], mm["cls_flip"][r] = run(x.flip(-1))
                    for m in mm.values():
                        m.flush()
                    status[r] = OK
                # Data first, then status: an interruption never marks unwritten rows as done.
                with atomic_output(root / "status.npy", fsync=False) as tmp:  # per batch: atomic, not synced
                    np.save(tmp, status)
                if bar is not None:
                    bar.update(len(batch["path"]) + len(batch["errors"]))
    finally:
        if bar is not None:
            bar.close()
        backbone.train(was_training)
