"""The pooled-features file written by `chexfound embed --out` (.safetensors or .npz), and its writer.

Contents, N = images embedded (unreadable ones are skipped and listed in the metadata):
  cls         [N, n_blocks, D]  normed CLS token of each of the last n blocks (ascending block order)
  patch_mean  [N, D]            mean of the last block's normed patch tokens
  index       [N] int64         position of each image in the input list
  image_id, path                strings (safetensors: NUL-separated UTF-8 in uint8 tensors `image_id_utf8`,
                                `path_utf8`; npz: unicode arrays)
metadata: kind="features", n_blocks, blocks, feature_dtype, autocast, backbone_sha256, backbone_config,
transform, count, skipped ([[index, path, reason], ...]).
`read_pooled(path)` gives it as `PooledFeatures` (see `chexfound.models.pooled`: `.vectors(n, avgpool)` is the
DINOv2 linear-probe input); `chexfound adapt --features FILE` trains linear/MLP heads on it directly.

`PooledFileWriter` is the engine's sink for this file (`chexfound.models.embedder`): work is cut into fixed
chunks of the input list; each finished chunk is written atomically to `<out>.parts/chunkNNNNNN.safetensors`,
a rerun skips chunks already there, and rank 0 merges the parts in order. `run.json` in the parts folder
records what the parts were made with; a rerun with other inputs or settings is refused instead of silently
mixing features.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chexfound.errors import CheckpointError, ChexfoundError
from chexfound.models.format import load_tensors, save_tensors
from chexfound.models.pooled import PooledFeatures, linear_input as _linear_input
from chexfound.runio import atomic_output, atomic_write_bytes, skipped_rows, write_skipped

FEATURE_SUFFIXES = (".safetensors", ".npz")


def encode_strings(items: list[str]) -> torch.Tensor:
    """Strings -> one uint8 tensor (NUL-separated UTF-8): safetensors holds only tensors, and a million
    paths would not fit its JSON header."""
    for s in items:
        if "\0" in s:
            raise ValueError(f"string contains NUL: {s!r}")
    data = "\0".join(items).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def decode_strings(t: torch.Tensor, n: int) -> list[str]:
    if n == 0:
        return []
    out = bytes(t.numpy().tobytes()).decode("utf-8").split("\0")
    if len(out) != n:
        raise ValueError(f"expected {n} strings, decoded {len(out)}")
    return out


def write_features(path: str | PathLike[str], arrays: dict[str, np.ndarray], ids: list[str], paths: list[str],
                   meta: dict[str, Any]) -> None:
    """Atomically write a features file; the format follows the suffix (.safetensors or .npz)."""
    p = Path(path)
    meta = {"kind": "features", **meta}
    if p.suffix == ".safetensors":
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        tensors["image_id_utf8"] = encode_strings(ids)
        tensors["path_utf8"] = encode_strings(paths)
        save_tensors(p, tensors, meta)
    elif p.suffix == ".npz":
        with atomic_output(p) as tmp:
            np.savez(tmp, **arrays, image_id=np.array(ids, dtype=str), path=np.array(paths, dtype=str),
                     meta=np.array(json.dumps(meta)))
    else:
        raise ValueError(f"features file must end with {' or '.join(FEATURE_SUFFIXES)}: {p}")


def read_features(path: str | PathLike[str]) -> dict[str, Any]:
    """-> {"cls": ndarray, "patch_mean": ndarray, "index": ndarray, "image_id": [str], "path": [str], "meta": dict}."""
    p = Path(path)
    if p.suffix == ".safetensors":
        tensors, meta = load_tensors(p)
        if meta.get("kind") != "features":
            raise CheckpointError(p, f"not a features file (kind={meta.get('kind')!r})")
        n = int(tensors["index"].shape[0])
        out: dict[str, Any] = {k: tensors[k].numpy() for k in ("cls", "patch_mean", "index")}
        out["image_id"] = decode_strings(tensors["image_id_utf8"], n)
        out["path"] = decode_strings(tensors["path_utf8"], n)
        out["meta"] = meta
        return out
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                out = {k: z[k] for k in ("cls", "patch_mean", "index")}
                out["image_id"] = [str(s) for s in z["image_id"]]
                out["path"] = [str(s) for s in z["path"]]
                out["meta"] = json.loads(str(z["meta"]))
        except (OSError, KeyError, ValueError) as e:
            raise CheckpointError(p, f"not a readable features .npz ({e})") from e
        return out
    raise CheckpointError(p, f"features files end with {' or '.join(FEATURE_SUFFIXES)}")


def linear_input(features: dict[str, Any], n_blocks: int = 1, avgpool: bool = False) -> np.ndarray:
    """DINOv2 linear-probe input of a `read_features` dict (see `chexfound.models.pooled.linear_input`)."""
    return _linear_input(np.asarray(features["cls"], dtype=np.float32),
                         np.asarray(features["patch_mean"], dtype=np.float32), n_blocks, avgpool)


def read_pooled(path: str | PathLike[str]) -> PooledFeatures:
    """A features file as PooledFeatures: one row per embedded image (unreadable inputs are not rows; they
    are listed in meta["skipped"] by their input index)."""
    f = read_features(path)
    n = len(f["index"])
    return PooledFeatures(np.asarray(f["cls"], dtype=np.float32), np.asarray(f["patch_mean"], dtype=np.float32),
                          np.ones(n, dtype=bool), [], list(f["image_id"]), list(f["path"]), dict(f["meta"]))


# -- the engine's sink ------------------------------------------------------------------------------------
@dataclass
class EmbedResult:
    out: Path
    count: int
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    computed_chunks: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def inputs_sha256(paths: Sequence[str], ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p, i in zip(paths, ids):
        h.update(p.encode())
        h.update(b"\0")
        h.update(i.encode())
        h.update(b"\n")
    return h.hexdigest()


# A finished file is reused when these match (chunk_size only shapes the parts, not the result).
_SAME_RUN = ("inputs_sha256", "backbone_sha256", "transform", "n_blocks", "feature_dtype", "autocast")


class PooledFileWriter:
    """Sink writing pooled features (CLS of every cached block + mean patch token) to one features file."""

    wants_flip = False

    def __init__(self, out: str | PathLike[str], paths: Sequence[str], ids: Sequence[str], *, n_blocks: int,
                 chunk_size: int, feature_dtype: str = "float32", autocast: str = "fp32",
                 meta: dict[str, Any] | None = None, keep_parts: bool = False,
                 settings: dict[str, Any] | None = None) -> None:
        self.out = Path(out)
        if self.out.suffix not in FEATURE_SUFFIXES:
            raise ChexfoundError(f"{self.out}: a features file ends with {' or '.join(FEATURE_SUFFIXES)}")
        if feature_dtype not in ("float32", "float16"):
            raise ChexfoundError(f"feature dtype {feature_dtype!r}: use float32 or float16")
        self.paths, self.ids = list(paths), list(ids)
        self.n_blocks, self.chunk_size, self.keep_parts = n_blocks, chunk_size, keep_parts
        self.feature_dtype, self.dtype = feature_dtype, getattr(torch, feature_dtype)
        self.meta = dict(meta or {})
        self.settings = dict(settings or {})
        self.pdir = self.out.with_name(self.out.name + ".parts")
        self.fingerprint = {"inputs_sha256": inputs_sha256(self.paths, self.ids), "count": len(self.paths),
                            "backbone_sha256": self.meta.get("backbone_sha256", ""),
                            "transform": self.meta.get("transform", {}), "n_blocks": n_blocks,
                            "chunk_size": chunk_size, "feature_dtype": feature_dtype, "autocast": autocast}
        self.done_earlier: EmbedResult | None = None
        self._acc: dict[int, dict[str, list[Any]]] = {}

    @property
    def metrics_path(self) -> Path:
        return self.pdir / "metrics.jsonl"

    # -- before the work --
    def open(self, rank: int) -> None:
        """Rank 0: reuse a finished file, or create/validate the parts folder (the engine then syncs ranks)."""
        self.done_earlier = self._finished_earlier()
        if self.done_earlier is not None or rank != 0:
            return
        self.pdir.mkdir(parents=True, exist_ok=True)
        run = self.pdir / "run.json"
        if run.is_file():
            old = json.loads(run.read_text())
            if old != self.fingerprint:
                diff = sorted(k for k in self.fingerprint if old.get(k) != self.fingerprint[k])
                raise ChexfoundError(f"{self.pdir}: partial results were made with different {', '.join(diff)}; "
                                     "delete that folder or choose another --out")
        else:
            atomic_write_bytes(run, json.dumps(self.fingerprint, indent=1).encode())

    def _finished_earlier(self) -> EmbedResult | None:
        """A rerun after a completed run: the output already holds these inputs with these settings."""
        if not self.out.is_file() or self.pdir.exists():
            return None
        try:
            meta = read_features(self.out)["meta"]
        except ChexfoundError:
            return None
        if any(meta.get(k) != self.fingerprint[k] for k in _SAME_RUN):
            return None
        skipped = [(int(a), str(b), str(c)) for a, b, c in meta.get("skipped", [])]
        return EmbedResult(out=self.out, count=int(meta.get("count", 0)), skipped=skipped)

    def _part(self, c: int) -> Path:
        return self.pdir / f"chunk{c:06d}.safetensors"

    def pending(self, chunk: int, lo: int, hi: int) -> np.ndarray:
        if self.done_earlier is not None or self._part(chunk).is_file():
            return np.zeros(0, dtype=np.int64)
        self._acc[chunk] = {"idx": [], "cls": [], "pm": [], "err": []}
        return np.arange(lo, hi, dtype=np.int64)

    # -- during --
    def add(self, chunk: int, batch: Any) -> None:
        acc = self._acc.get(chunk)
        if acc is None:
            return
        cls, pm = batch.pooled()
        acc["cls"].append(cls.to(self.dtype))
        acc["pm"].append(pm.to(self.dtype))
        acc["idx"] += batch.rows.tolist()

    def add_errors(self, chunk: int, errors: list[tuple[int, str, str]]) -> None:
        if chunk in self._acc:
            self._acc[chunk]["err"] += errors

    def commit(self, chunk: int) -> None:
        acc = self._acc.pop(chunk, None)
        if acc is None:
            return
        d = int(acc["cls"][0].shape[-1]) if acc["cls"] else 0
        tensors = {
            "index": torch.tensor(acc["idx"], dtype=torch.int64),
            "cls": torch.cat(acc["cls"]) if acc["cls"] else torch.zeros(0, self.n_blocks, d, dtype=self.dtype),
            "patch_mean": torch.cat(acc["pm"]) if acc["pm"] else torch.zeros(0, d, dtype=self.dtype),
        }
        with atomic_output(self._part(chunk)) as tmp:
            save_file(tensors, str(tmp), metadata={"errors": json.dumps(acc["err"]), "dim": str(d)})

    # -- after (rank 0) --
    def finish(self) -> EmbedResult:
        if self.done_earlier is not None:
            return self.done_earlier
        n_chunks = (len(self.paths) + self.chunk_size - 1) // self.chunk_size
        missing = [c for c in range(n_chunks) if not self._part(c).is_file()]
        if missing:
            raise ChexfoundError(f"{self.pdir}: chunks {missing[:10]} are missing (a rank failed?); rerun to finish them")
        idx, cls, pm, errors, dim = [], [], [], [], 0
        for c in range(n_chunks):
            f = self._part(c)
            t = load_file(str(f))
            with safe_open(str(f), framework="pt") as h:
                md = h.metadata() or {}
            errors += [tuple(e) for e in json.loads(md.get("errors", "[]"))]
            dim = max(dim, int(md.get("dim", "0")))
            idx.append(t["index"])
            cls.append(t["cls"])
            pm.append(t["patch_mean"])
        # A chunk of only unreadable images has no width: give its empty arrays the common one.
        cls = [c if c.shape[-1] == dim else torch.zeros(0, self.n_blocks, dim, dtype=self.dtype) for c in cls]
        pm = [p if p.shape[-1] == dim else torch.zeros(0, dim, dtype=self.dtype) for p in pm]
        index = torch.cat(idx).numpy()
        arrays = {"index": index, "cls": torch.cat(cls).numpy(), "patch_mean": torch.cat(pm).numpy()}
        errors.sort()
        fp = self.fingerprint
        file_meta = {**self.meta, "transform": fp["transform"], "n_blocks": self.n_blocks,
                     "feature_dtype": self.feature_dtype, "autocast": fp["autocast"], "count": int(len(index)),
                     "inputs": len(self.paths), "inputs_sha256": fp["inputs_sha256"],
                     "backbone_sha256": fp["backbone_sha256"], "skipped": [list(e) for e in errors],
                     "settings": self.settings}
        write_features(self.out, arrays, [self.ids[i] for i in index], [self.paths[i] for i in index], file_meta)
        write_skipped(self.out.with_name(self.out.stem + ".skipped.csv"), skipped_rows("embed", errors))
        if self.metrics_path.is_file():
            shutil.copyfile(self.metrics_path, self.out.with_name(self.out.stem + ".metrics.jsonl"))
        if not self.keep_parts:
            shutil.rmtree(self.pdir, ignore_errors=True)
        return EmbedResult(out=self.out, count=int(len(index)), skipped=[(int(a), str(b), str(c)) for a, b, c in errors])
