"""Image-level features files written by `chexfound embed` (.safetensors or .npz).

Contents, N = images embedded (unreadable ones are skipped and listed in the metadata):
  cls         [N, n_blocks, D]  normed CLS token of each of the last n blocks (ascending block order)
  patch_mean  [N, D]            mean of the last block's normed patch tokens
  index       [N] int64         position of each image in the input list
  image_id, path                strings (safetensors: NUL-separated UTF-8 in uint8 tensors `image_id_utf8`,
                                `path_utf8`; npz: unicode arrays)
metadata: kind="features", n_blocks, blocks, feature_dtype, autocast, backbone_sha256, backbone_config,
transform, count, skipped ([[index, path, reason], ...]).
`linear_input(f, n_blocks, avgpool)` builds the DINOv2 linear-probe input (CLS of the last n blocks, plus
the mean patch token).
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chexfound.errors import CheckpointError
from chexfound.models.format import load_tensors, save_tensors
from chexfound.runio import atomic_output

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
    """DINOv2 linear-probe input: CLS of the last `n_blocks` blocks concatenated (+ mean patch token)."""
    cls = features["cls"]
    if n_blocks > cls.shape[1]:
        raise ValueError(f"file has CLS of {cls.shape[1]} blocks, asked for {n_blocks}")
    parts = [cls[:, -n_blocks:].reshape(len(cls), -1)]
    if avgpool:
        parts.append(features["patch_mean"])
    return np.concatenate(parts, axis=1).astype(np.float32)
