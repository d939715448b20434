"""The token cache: the frozen backbone's `get_intermediate_layers(x, n, return_class_token=True)` output
for every image (and its horizontal flip, if asked), on disk, memory-mapped, in float16, with the pooled
features of every image beside it. GLoRI trains on the tokens, linear/MLP heads and the logistic probes on
the pooled view; `chexfound embed --tokens DIR` and `chexfound adapt` write the same layout through the one
feature engine (`chexfound.models.embedder`), so a cache made by either is read by both.

Folder layout:
    cache.json          backbone sha256 + config, input transform, n_blocks, shapes, flip_tta, paths digest
    index.csv           row, id, path, status (ok / failed / pending), error
    patch.npy           float16 [N, n_blocks, P, D]   patch tokens (blocks ascending, as the backbone returns them)
    cls.npy             float16 [N, n_blocks, D]
    pooled_cls.npy      float32 [N, n_blocks, D]      CLS tokens as computed (the pooled view)
    patch_mean.npy      float32 [N, D]                mean of the last block's patch tokens, from the float tokens
    patch_flip.npy, cls_flip.npy   the same tokens for the horizontally flipped image (flip_tta=True)
    status.npy          uint8 [N]: 0 pending, 1 ok, 2 unreadable
    skipped.csv, metrics.jsonl     unreadable images as they happen (stage, index = row, path, reason);
                                   throughput per chunk (caches built before skipped.csv have errors.jsonl)

Building is resumable: rows are written chunk by chunk and `status.npy` only after their data, so an
interrupted build restarts where it stopped. Under torchrun each rank writes its own rows and its own
`status.rank<r>.npy`; rank 0 folds them into `status.npy` when all are done (and when a rerun starts after
an interruption). Building again with the same backbone (sha256), transform, n_blocks and paths reuses the
cache; anything else is refused (use another folder). Caches of format 1 (no pooled arrays) still open:
their pooled view is computed from the float16 tokens.
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

from chexfound.adapt.heads.base import Features
from chexfound.models.extract import resolve_dtype
from chexfound.runio import (SKIPPED_FILE, append_skipped, atomic_output, atomic_write_bytes, read_skipped,
                             resolve_device, skipped_rows)
from chexfound.errors import ConfigError
from chexfound.models.pooled import PooledFeatures

log = logging.getLogger(__name__)
PENDING, OK, FAILED = 0, 1, 2
_META = "cache.json"
FORMAT_VERSION = 2
_FP16_MAX = float(np.finfo(np.float16).max)


def _paths_digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def paths_and_ids(src: Any) -> tuple[list[str], list[str]]:
    """A Manifest (its resolved paths, image_id if present) or a sequence of paths."""
    if hasattr(src, "paths") and hasattr(src, "df"):
        paths = [str(p) for p in src.paths()]
        ids = src.df["image_id"].astype(str).tolist() if "image_id" in src.df.columns else list(paths)
        return paths, ids
    paths = [str(p) for p in src]
    return paths, list(paths)


class FeatureCache:
    """Frozen-backbone features on disk (patch and CLS tokens of the last blocks, memory-mapped), one row per
    image, with its index and errors: what heads train on without rerunning the backbone."""
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
        """Open the cache written in folder `root` (ConfigError if it is not one); `in_memory` loads it instead of
        memory-mapping."""
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
        chunk_size: int = 256,
        pack: bool = False,
        compile: bool = False,
    ) -> "FeatureCache":
        """Compute (or resume, or reuse) the cache of these images in `out_dir` with the feature engine.
        `dtype` is the compute dtype (fp32 | bf16 | fp16); `pack`/`compile` choose the fast path
        (`chexfound.models.inference`)."""
        from chexfound.data.transform import InputTransform
        from chexfound.models.embedder import EmbedSettings, run_engine

        paths, ids = paths_and_ids(paths_or_manifest)
        tf = transform if transform is not None else InputTransform.for_backbone(backbone.cfg)
        writer = TokenCacheWriter(out_dir, backbone, paths, ids, tf, n_blocks, flip_tta, backbone_sha256)
        compute = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_dtype(dtype)]
        settings = EmbedSettings(n_blocks=n_blocks, batch_size=batch_size, chunk_size=chunk_size, workers=workers,
                                 autocast=str(compute), pack=pack, compile=compile)
        run_engine(backbone, tf, paths, [writer], settings, resolve_device(device), progress,
                   desc="caching features", metrics=writer.root / "metrics.jsonl")
        return cls.open(writer.root)

    # -- reading --
    def __len__(self) -> int:
        return len(self._status)

    @property
    def paths(self) -> list[str]:
        """Image path of each row, in cache order."""
        return self._index["path"].astype(str).tolist()

    @property
    def ids(self) -> list[str]:
        """Id of each row (what resuming and label matching key on)."""
        return self._index["id"].astype(str).tolist()

    @property
    def valid(self) -> np.ndarray:
        """Boolean per row: features were computed (False: the image could not be read)."""
        return self._status == OK

    @property
    def has_flip(self) -> bool:
        """Whether horizontally flipped features were cached too (for flip augmentation)."""
        return self._patch_flip is not None

    @property
    def errors(self) -> list[tuple[int, str, str]]:
        """(row, path, reason) of the images that could not be read."""
        reasons = _read_errors(self.root)
        paths = self.paths
        return [(int(i), paths[i], reasons.get(int(i), "unreadable")) for i in np.flatnonzero(self._status == FAILED)]

    @property
    def n_blocks(self) -> int:
        """How many of the backbone's last blocks were cached."""
        return int(self.meta["n_blocks"])

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the cached patch tokens."""
        return int(self.meta["grid"][0]), int(self.meta["grid"][1])

    @property
    def backbone_sha256(self) -> str:
        """Weights hash of the backbone the features came from (heads trained on them record it)."""
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

    def pooled(self) -> PooledFeatures:
        """Pooled features of every row (zeros where the image was unreadable): the CLS tokens and mean patch
        token as the engine computed them in float32 (format 1 caches: from the float16 tokens)."""
        if (self.root / "patch_mean.npy").is_file():
            cls = np.array(np.load(self.root / "pooled_cls.npy", mmap_mode="r"), dtype=np.float32)
            pm = np.array(np.load(self.root / "patch_mean.npy", mmap_mode="r"), dtype=np.float32)
        else:
            cls = np.asarray(self._cls, dtype=np.float32)
            pm = np.zeros((len(self), cls.shape[-1]), dtype=np.float32)
            for s in range(0, len(self), 256):
                pm[s : s + 256] = np.asarray(self._patch[s : s + 256, -1], dtype=np.float32).mean(axis=1)
        ok = self.valid
        cls[~ok] = 0
        pm[~ok] = 0
        return PooledFeatures(cls, pm, ok.copy(), self.errors, self.ids, self.paths, dict(self.meta))


class TokenCacheWriter:
    """The engine's sink for a token cache folder (see the module doc for the layout)."""

    def __init__(self, out_dir: str | PathLike[str], backbone: torch.nn.Module, paths: Sequence[str],
                 ids: Sequence[str], transform: Any, n_blocks: int, flip_tta: bool = False,
                 backbone_sha256: str | None = None) -> None:
        from chexfound.models import backbone_sha256 as sha_of

        self.root = Path(out_dir)
        self.paths, self.ids = [str(p) for p in paths], [str(i) for i in ids]
        if not self.paths:
            raise ConfigError(self.root, "no images to cache")
        depth = len(backbone.blocks)  # type: ignore[arg-type]
        if not 1 <= n_blocks <= depth:
            raise ConfigError(self.root, f"n_blocks={n_blocks} but the backbone has {depth} blocks")
        self.n_blocks, self.wants_flip = n_blocks, bool(flip_tta)
        tf_dict = transform.to_dict() if hasattr(transform, "to_dict") else {"callable": repr(transform)}
        size = int(tf_dict.get("size", backbone.cfg.img_size))  # type: ignore[union-attr]
        p = backbone.patch_size  # type: ignore[union-attr]
        self.grid = (size // p, size // p)
        self.embed_dim = int(backbone.embed_dim)  # type: ignore[arg-type]
        self.backbone_config = backbone.cfg.to_dict()  # type: ignore[union-attr]
        self.want = {"backbone_sha256": backbone_sha256 or sha_of(backbone), "transform": tf_dict,
                     "n_blocks": n_blocks, "flip_tta": self.wants_flip, "paths_sha256": _paths_digest(self.paths),
                     "n": len(self.paths)}
        self.rank = 0
        self.status: np.ndarray | None = None
        self._mm: dict[str, np.ndarray] = {}

    def _names(self) -> list[str]:
        return ["patch", "cls"] + (["patch_flip", "cls_flip"] if self.wants_flip else [])

    # -- before the work --
    def open(self, rank: int) -> None:
        self.rank = rank
        if rank == 0:
            self._create_or_check()
            _fold_rank_status(self.root)

    def _create_or_check(self) -> None:
        root = self.root
        if (root / _META).is_file():
            have = json.loads((root / _META).read_text())
            diff = [k for k, v in self.want.items() if have.get(k) != v]
            if diff:
                raise ConfigError(root, f"a feature cache for different inputs is already here ({', '.join(diff)} "
                                        "differ); use another cache folder or delete this one")
            if int(have.get("format_version", 1)) < FORMAT_VERSION and (np.load(root / "status.npy") == PENDING).any():
                raise ConfigError(root, "an unfinished cache of an older format: delete it and build again")
            return
        n, (gh, gw), d = len(self.paths), self.grid, self.embed_dim
        p_tok = gh * gw
        need = n * self.n_blocks * (p_tok + 1) * d * 2 * (2 if self.wants_flip else 1) + n * (self.n_blocks + 1) * d * 4
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if need > free:
            raise ConfigError(root, f"the cache needs {need / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB free")
        shapes = {"patch": ((n, self.n_blocks, p_tok, d), np.float16), "cls": ((n, self.n_blocks, d), np.float16),
                  "pooled_cls": ((n, self.n_blocks, d), np.float32), "patch_mean": ((n, d), np.float32)}
        for name, (shape, dt) in shapes.items():
            for suffix in ([""] + (["_flip"] if self.wants_flip and name in ("patch", "cls") else [])):
                np.lib.format.open_memmap(root / f"{name}{suffix}.npy", mode="w+", dtype=dt, shape=shape).flush()
        np.save(root / "status.npy", np.zeros(n, dtype=np.uint8))
        _write_index(root, self.paths, self.ids, np.zeros(n, dtype=np.uint8), {})
        meta = {**self.want, "backbone_config": self.backbone_config, "num_patches": p_tok, "embed_dim": d,
                "grid": list(self.grid), "dtype": "float16", "format_version": FORMAT_VERSION}
        atomic_write_bytes(root / _META, json.dumps(meta, indent=1).encode())  # last: marks the layout complete

    def _status(self) -> np.ndarray:
        if self.status is None:  # read after the ranks synchronised (rank 0 folded leftovers into it)
            self.status = np.load(self.root / "status.npy")
        return self.status

    def pending(self, chunk: int, lo: int, hi: int) -> np.ndarray:
        st = self._status()
        return lo + np.flatnonzero(st[lo:hi] == PENDING)

    # -- during --
    def _maps(self) -> dict[str, np.ndarray]:
        if not self._mm:
            self._mm = {name: np.load(self.root / f"{name}.npy", mmap_mode="r+")
                        for name in self._names() + ["pooled_cls", "patch_mean"]}
        return self._mm

    def add(self, chunk: int, batch: Any) -> None:
        mm, r = self._maps(), batch.rows

        def tokens(outs: Any) -> tuple[np.ndarray, np.ndarray]:
            pt = torch.stack([o[0] for o in outs], 1).float().clamp(-_FP16_MAX, _FP16_MAX).half().cpu().numpy()
            ct = torch.stack([o[1] for o in outs], 1).float().clamp(-_FP16_MAX, _FP16_MAX).half().cpu().numpy()
            return pt, ct

        mm["patch"][r], mm["cls"][r] = tokens(batch.tokens)
        if self.wants_flip and batch.flipped is not None:
            mm["patch_flip"][r], mm["cls_flip"][r] = tokens(batch.flipped)
        cls, pm = batch.pooled()
        mm["pooled_cls"][r], mm["patch_mean"][r] = cls.numpy(), pm.numpy()
        self._status()[r] = OK

    def add_errors(self, chunk: int, errors: list[tuple[int, str, str]]) -> None:
        st = self._status()
        for row, path, reason in errors:
            st[row] = FAILED
            log.warning("skipping %s: %s", path, reason)
        if errors:  # appended as they happen, so an interrupted build keeps them
            append_skipped(self.root / SKIPPED_FILE, skipped_rows("features", errors))

    def commit(self, chunk: int) -> None:
        # Data first, then status: an interruption never marks unwritten rows as done.
        for m in self._maps().values():
            m.flush()
        name = "status.npy" if not _multi_rank() else f"status.rank{self.rank}.npy"
        with atomic_output(self.root / name, fsync=False) as tmp:  # per chunk: atomic, not synced
            np.save(tmp, self._status())

    # -- after (rank 0) --
    def finish(self) -> Path:
        self._mm = {}
        _fold_rank_status(self.root)
        status = np.load(self.root / "status.npy")
        names = np.array(["pending", "ok", "failed"])[status]
        listed = pd.read_csv(self.root / "index.csv", keep_default_na=False)["status"].to_numpy()
        if len(listed) != len(names) or (listed != names).any():  # a rerun that computed nothing leaves it be
            _write_index(self.root, self.paths, self.ids, status, _read_errors(self.root))
        return self.root


def _multi_rank() -> bool:
    from chexfound.runio import distributed as D

    return D.world_size() > 1


def _rank_files(root: Path) -> list[Path]:
    return sorted(root.glob("status.rank*.npy"))


def _fold_rank_status(root: Path) -> None:
    """Fold per-rank status files (a multi-rank build) into status.npy, then remove them."""
    files = _rank_files(root)
    if not files:
        return
    status = np.load(root / "status.npy")
    for f in files:
        mine = np.load(f)
        status = np.where(mine != PENDING, mine, status)
    with atomic_output(root / "status.npy") as tmp:
        np.save(tmp, status)
    for f in files:
        f.unlink()


def _read_errors(root: Path) -> dict[int, str]:
    """Row -> reason of the unreadable images, from skipped.csv (and errors.jsonl of caches built before it)."""
    out: dict[int, str] = {}
    for name in ("errors.jsonl", SKIPPED_FILE):
        for s in read_skipped(root / name):
            if s.index is not None:
                out[s.index] = s.reason
    return out


def _write_index(root: Path, paths: list[str], ids: list[str], status: np.ndarray, errors: dict[int, str]) -> None:
    names = {PENDING: "pending", OK: "ok", FAILED: "failed"}
    df = pd.DataFrame({"row": np.arange(len(paths)), "id": ids, "path": paths,
                       "status": [names[int(s)] for s in status],
                       "error": [errors.get(i, "") for i in range(len(paths))]})
    atomic_write_bytes(root / "index.csv", df.to_csv(index=False).encode())
