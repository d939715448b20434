"""Embed many images into one features file: batched, resumable, shardable over ranks.

Work is cut into fixed chunks of the input list (chunk c = images [c*C, (c+1)*C)). Each finished chunk is
written atomically to `<out>.parts/chunkNNNNNN.safetensors`; a rerun skips chunks already there, so an
interruption costs at most one chunk per rank. Under torch.distributed, rank r takes chunks c with
c % world == r (so a rerun may use a different number of ranks), and rank 0 merges the parts in order.
`run.json` in the parts folder records what the parts were made with; a rerun with other inputs or
settings is refused instead of silently mixing features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from chexfound.errors import ChexfoundError
from chexfound.models.features import write_features
from chexfound.models.vit import VisionTransformer
from chexfound.runio import RunLog, atomic_output, atomic_write_bytes, resolve_device
from chexfound.runio import distributed as D

log = logging.getLogger(__name__)


@dataclass
class EmbedSettings:
    n_blocks: int = 4
    batch_size: int = 16
    chunk_size: int = 256
    workers: int = 0
    feature_dtype: str = "float32"  # float32 | float16
    autocast: str = "fp32"  # fp32 | bf16
    keep_parts: bool = False


@dataclass
class EmbedResult:
    out: Path
    count: int
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    computed_chunks: int = 0
    seconds: float = 0.0


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _fingerprint(paths: Sequence[str], ids: Sequence[str], backbone_sha: str, transform: dict[str, Any],
                 settings: EmbedSettings) -> dict[str, Any]:
    h = hashlib.sha256()
    for p, i in zip(paths, ids):
        h.update(p.encode())
        h.update(b"\0")
        h.update(i.encode())
        h.update(b"\n")
    return {"inputs_sha256": h.hexdigest(), "count": len(paths), "backbone_sha256": backbone_sha,
            "transform": transform, "n_blocks": settings.n_blocks, "chunk_size": settings.chunk_size,
            "feature_dtype": settings.feature_dtype, "autocast": settings.autocast}


def _check_run(pdir: Path, fp: dict[str, Any], rank: int) -> None:
    run = pdir / "run.json"
    if rank == 0:
        pdir.mkdir(parents=True, exist_ok=True)
        if run.is_file():
            old = json.loads(run.read_text())
            if old != fp:
                diff = sorted(k for k in fp if old.get(k) != fp[k])
                raise ChexfoundError(f"{pdir}: partial results were made with different {', '.join(diff)}; "
                                     "delete that folder or choose another --out")
        else:
            atomic_write_bytes(run, json.dumps(fp, indent=1).encode())
    D.barrier()


_SAME_RUN = ("inputs_sha256", "backbone_sha256", "transform", "n_blocks", "feature_dtype", "autocast")


def _finished_earlier(out: Path, pdir: Path, fp: dict[str, Any]) -> EmbedResult | None:
    """A rerun after a completed run: the output already holds these inputs with these settings."""
    if not out.is_file() or pdir.exists():
        return None
    from chexfound.models.features import read_features

    try:
        meta = read_features(out)["meta"]
    except ChexfoundError:
        return None
    if any(meta.get(k) != fp[k] for k in _SAME_RUN):
        return None
    skipped = [(int(a), str(b), str(c)) for a, b, c in meta.get("skipped", [])]
    return EmbedResult(out=out, count=int(meta.get("count", 0)), skipped=skipped)


def _chunk_file(pdir: Path, c: int) -> Path:
    return pdir / f"chunk{c:06d}.safetensors"


def _save_chunk(pdir: Path, c: int, idx: list[int], cls: list[torch.Tensor], pm: list[torch.Tensor],
                errors: list[tuple[int, str, str]], dim: int, n_blocks: int, dtype: torch.dtype) -> None:
    tensors = {
        "index": torch.tensor(idx, dtype=torch.int64),
        "cls": torch.cat(cls).to(dtype) if cls else torch.zeros(0, n_blocks, dim, dtype=dtype),
        "patch_mean": torch.cat(pm).to(dtype) if pm else torch.zeros(0, dim, dtype=dtype),
    }
    final = _chunk_file(pdir, c)
    with atomic_output(final) as tmp:
        save_file(tensors, str(tmp), metadata={"errors": json.dumps(errors)})


def embed_paths(
    model: VisionTransformer,
    transform: Callable[[np.ndarray], torch.Tensor],
    paths: Sequence[str],
    ids: Sequence[str],
    out: str | Path,
    settings: EmbedSettings,
    device: torch.device | str = "cpu",
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> EmbedResult | None:
    """Embed `paths` into the features file `out` (.safetensors/.npz). Returns the result on rank 0
    (None on other ranks). `meta` is stored in the file (backbone identity, transform, ...)."""
    from chexfound.data.datasets import ImageDataset, collate_skip_errors

    t0 = time.perf_counter()
    out = Path(out)
    device = resolve_device(device)
    rank, world = D.rank(), D.world_size()
    meta = dict(meta or {})
    if len(paths) != len(ids):
        raise ValueError("paths and ids differ in length")
    if not paths:
        raise ChexfoundError("no images to embed")
    if settings.feature_dtype not in ("float32", "float16"):
        raise ChexfoundError(f"feature dtype {settings.feature_dtype!r}: use float32 or float16")
    fdtype = getattr(torch, settings.feature_dtype)
    depth = len(model.blocks)
    if not 1 <= settings.n_blocks <= depth:
        raise ChexfoundError(f"--n-blocks {settings.n_blocks}: the backbone has {depth} blocks")
    pdir = parts_dir(out)
    fp = _fingerprint(paths, ids, meta.get("backbone_sha256", ""), meta.get("transform", {}), settings)
    done = _finished_earlier(out, pdir, fp)
    if done is not None:
        log.info("%s is already complete for these inputs and settings; nothing to do", out)
        return done if rank == 0 else None
    _check_run(pdir, fp, rank)

    n = len(paths)
    n_chunks = (n + settings.chunk_size - 1) // settings.chunk_size
    mine = [c for c in range(n_chunks) if c % world == rank and not _chunk_file(pdir, c).is_file()]
    batches: list[list[int]] = []
    batch_chunk: list[int] = []
    for c in mine:
        lo, hi = c * settings.chunk_size, min(n, (c + 1) * settings.chunk_size)
        for s in range(lo, hi, settings.batch_size):
            batches.append(list(range(s, min(hi, s + settings.batch_size))))
            batch_chunk.append(c)
    total = sum(len(b) for b in batches)
    log.info("rank %d/%d: %d of %d chunks to embed (%d images)", rank, world, len(mine), n_chunks, total)

    dataset = ImageDataset([str(p) for p in paths], transform)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_skip_errors,
                        num_workers=settings.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    bar = None
    if progress and rank == 0 and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc="embed", dynamic_ncols=True)
    amp = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
           if settings.autocast == "bf16" else nullcontext())
    model = model.to(device).eval()
    dim = model.embed_dim
    acc: dict[str, Any] = {"idx": [], "cls": [], "pm": [], "err": []}
    remaining = {c: sum(len(b) for b, bc in zip(batches, batch_chunk) if bc == c) for c in mine}
    metrics = RunLog(pdir / "metrics.jsonl")  # every rank logs its own chunks (rows carry the rank)
    t_chunk = time.perf_counter()
    done_chunks = 0
    with torch.inference_mode():
        for j, batch in enumerate(loader):
            c = batch_chunk[j]
            acc["err"] += [(int(i), str(p), str(r)) for i, p, r in batch["errors"]]
            if "image" in batch:
                x = batch["image"].to(device, non_blocking=True)
                with amp:
                    outs = model.get_intermediate_layers(x, settings.n_blocks, return_class_token=True)
                acc["cls"].append(torch.stack([cl.float() for _, cl in outs], dim=1).cpu())
                acc["pm"].append(outs[-1][0].float().mean(dim=1).cpu())
                acc["idx"] += batch["index"].tolist()
            k = len(batches[j])
            remaining[c] -= k
            if bar is not None:
                bar.update(k)
            if remaining[c] == 0:
                _save_chunk(pdir, c, acc["idx"], acc["cls"], acc["pm"], acc["err"], dim, settings.n_blocks, fdtype)
                dt = time.perf_counter() - t_chunk
                metrics.write("chunk", rank=rank, chunk=c, images=len(acc["idx"]), skipped=len(acc["err"]),
                              seconds=round(dt, 3), images_per_s=round(len(acc["idx"]) / dt, 3) if dt else None)
                acc = {"idx": [], "cls": [], "pm": [], "err": []}
                t_chunk = time.perf_counter()
                done_chunks += 1
    if bar is not None:
        bar.close()
    D.barrier()
    if rank != 0:
        return None
    result = _merge(out, pdir, n_chunks, list(paths), list(ids), settings, meta, fp)
    result.computed_chunks = done_chunks
    result.seconds = time.perf_counter() - t0
    return result


def _merge(out: Path, pdir: Path, n_chunks: int, paths: list[str], ids: list[str], settings: EmbedSettings,
           meta: dict[str, Any], fp: dict[str, Any]) -> EmbedResult:
    missing = [c for c in range(n_chunks) if not _chunk_file(pdir, c).is_file()]
    if missing:
        raise ChexfoundError(f"{pdir}: chunks {missing[:10]} are missing (a rank failed?); rerun to finish them")
    idx, cls, pm, errors = [], [], [], []
    for c in range(n_chunks):
        f = _chunk_file(pdir, c)
        t = load_file(str(f))
        with safe_open(str(f), framework="pt") as h:
            errors += [tuple(e) for e in json.loads((h.metadata() or {}).get("errors", "[]"))]
        idx.append(t["index"])
        cls.append(t["cls"])
        pm.append(t["patch_mean"])
    index = torch.cat(idx).numpy()
    arrays = {"index": index, "cls": torch.cat(cls).numpy(), "patch_mean": torch.cat(pm).numpy()}
    errors.sort()
    file_meta = {**meta, "transform": fp["transform"], "n_blocks": settings.n_blocks, "feature_dtype": settings.feature_dtype,
                 "autocast": settings.autocast, "count": int(len(index)), "inputs": len(paths),
                 "inputs_sha256": fp["inputs_sha256"], "backbone_sha256": fp["backbone_sha256"],
                 "skipped": [list(e) for e in errors],
                 "settings": asdict(settings)}
    write_features(out, arrays, [ids[i] for i in index], [paths[i] for i in index], file_meta)
    skipped_csv = out.with_name(out.stem + ".skipped.csv")
    if errors:
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["index", "path", "reason"])
        w.writerows(errors)
        atomic_write_bytes(skipped_csv, buf.getvalue().encode())
    else:
        skipped_csv.unlink(missing_ok=True)
    metrics = pdir / "metrics.jsonl"
    if metrics.is_file():
        shutil.copyfile(metrics, out.with_name(out.stem + ".metrics.jsonl"))
    if not settings.keep_parts:
        shutil.rmtree(pdir, ignore_errors=True)
    return EmbedResult(out=out, count=int(len(index)), skipped=[(int(a), str(b), str(c)) for a, b, c in errors])
