"""The feature engine: image files -> backbone -> sinks. Batched, resumable, shardable over ranks.

Every feature file of the project is made here, whatever it holds: `chexfound embed` (a pooled-features
file, `PooledFileWriter`), the adapt/evaluate token cache (`chexfound.adapt.token_cache.TokenCacheWriter`:
full patch tokens of the last n blocks for GLoRI), or both from one forward pass.

Work is cut into fixed chunks of the input list (chunk c = rows [c*C, (c+1)*C)). Each sink says which rows
of a chunk it still needs (resume), receives every computed batch, and persists a chunk when it is complete
(`commit`), so an interruption costs at most one chunk per rank. Under torch.distributed, rank r takes
chunks c with c % world == r (a rerun may use another number of ranks) and rank 0 finishes the sinks.

The data path: worker processes read and resize (`InputTransform.prepare`), images travel as uint8 on a
GPU (4x fewer bytes through pinned memory, copied without blocking) and are normalised on the device;
the backbone runs with the settings of `chexfound.models.inference` (packed CPU GEMMs, per-block
torch.compile, CUDA graphs at a fixed batch shape).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from chexfound.errors import ChexfoundError
from chexfound.models.extract import BlockOutputs
from chexfound.models.inference import CudaGraphForward, InferenceSettings, prepare_backbone, run_context
from chexfound.models.pooled import pool_tokens
from chexfound.models.pooled_file import EmbedResult, PooledFileWriter
from chexfound.runio import RunLog, resolve_device
from chexfound.runio import distributed as D

log = logging.getLogger(__name__)


@dataclass
class EmbedSettings:
    n_blocks: int = 4
    batch_size: int = 16
    chunk_size: int = 256
    workers: int = 0
    feature_dtype: str = "float32"  # float32 | float16 (the pooled file)
    autocast: str = "fp32"          # fp32 | bf16 | fp16: compute dtype
    keep_parts: bool = False
    pack: bool = False              # CPU: oneDNN packed weights (the CLIs turn it on)
    compile: bool = False           # per-block torch.compile, static shapes
    cuda_graphs: bool = False       # CUDA: replay a captured graph at the fixed batch shape
    sdpa: str = "auto"
    transfer: str = "auto"          # uint8 | float32 | auto (uint8 on CUDA, float32 on CPU: nothing to copy)

    def inference(self) -> InferenceSettings:
        return InferenceSettings(compute=self.autocast, pack=self.pack, compile=self.compile,
                                 cuda_graphs=self.cuda_graphs, sdpa=self.sdpa)

    def transfer_dtype(self, device: torch.device) -> torch.dtype:
        if self.transfer not in ("auto", "uint8", "float32"):
            raise ChexfoundError(f"transfer dtype {self.transfer!r}: use auto, uint8 or float32")
        if self.transfer == "auto":
            return torch.uint8 if device.type == "cuda" else torch.float32
        return torch.uint8 if self.transfer == "uint8" else torch.float32


class Batch:
    """One computed batch handed to the sinks: absolute rows and the block outputs (on the device)."""

    def __init__(self, rows: np.ndarray, tokens: BlockOutputs, flipped: BlockOutputs | None) -> None:
        self.rows, self.tokens, self.flipped = rows, tokens, flipped
        self._pooled: tuple[Tensor, Tensor] | None = None

    def pooled(self) -> tuple[Tensor, Tensor]:
        """(cls [B, n, D], patch_mean [B, D]) float32 on the CPU, computed once for all sinks."""
        if self._pooled is None:
            cls, pm = pool_tokens(self.tokens)
            self._pooled = (cls.cpu(), pm.cpu())
        return self._pooled


class FeatureSink(Protocol):
    """Where features go. `open` runs on every rank before any work (rank 0 creates shared files; the engine
    synchronises ranks after it), `finish` on rank 0 after every rank committed its chunks."""

    wants_flip: bool

    def open(self, rank: int) -> None: ...

    def pending(self, chunk: int, lo: int, hi: int) -> np.ndarray: ...

    def add(self, chunk: int, batch: Batch) -> None: ...

    def add_errors(self, chunk: int, errors: list[tuple[int, str, str]]) -> None: ...

    def commit(self, chunk: int) -> None: ...

    def finish(self) -> Any: ...


@dataclass
class EngineRun:
    """What one call computed on this rank, and where its time went (seconds)."""

    results: list[Any]
    images: int = 0
    computed_chunks: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def _plan(n: int, settings: EmbedSettings, sinks: Sequence[FeatureSink], rank: int,
          world: int) -> list[tuple[int, list[int]]]:
    """This rank's batches as (chunk, rows): rows any sink still needs, in chunk order."""
    batches: list[tuple[int, list[int]]] = []
    n_chunks = (n + settings.chunk_size - 1) // settings.chunk_size
    for c in range(rank, n_chunks, world):
        lo, hi = c * settings.chunk_size, min(n, (c + 1) * settings.chunk_size)
        need = np.zeros(0, dtype=np.int64)
        for s in sinks:
            need = np.union1d(need, s.pending(c, lo, hi))
        rows = need.astype(int).tolist()
        for s0 in range(0, len(rows), settings.batch_size):
            batches.append((c, rows[s0 : s0 + settings.batch_size]))
    return batches


def _forward_fn(model: nn.Module, device: torch.device, settings: EmbedSettings) -> Callable[[Tensor], BlockOutputs]:
    inf = settings.inference()
    ctx = run_context(device, inf)
    if settings.cuda_graphs:
        if device.type != "cuda":
            raise ChexfoundError("--cuda-graphs needs a CUDA device")
        return CudaGraphForward(model, settings.n_blocks, ctx)

    def fwd(x: Tensor) -> BlockOutputs:
        with ctx():
            return tuple(model.get_intermediate_layers(x, n=settings.n_blocks, return_class_token=True))

    return fwd


def _pad(x: Tensor, size: int) -> Tensor:
    """Zero-pad a batch to `size` rows (compiled graphs and CUDA graphs are per shape)."""
    if x.shape[0] >= size:
        return x
    return torch.cat([x, x.new_zeros((size - x.shape[0], *x.shape[1:]))])


def run_engine(model: nn.Module, transform: Any, paths: Sequence[str], sinks: Sequence[FeatureSink],
               settings: EmbedSettings, device: torch.device | str = "cpu", progress: bool = True,
               desc: str = "embed", metrics: Path | None = None) -> EngineRun:
    """Compute the rows the sinks still need and hand them over. Returns the sinks' `finish()` results on
    rank 0 (an empty list elsewhere). `transform` is an InputTransform (its `prepare` runs in the loader
    workers, `normalise` on the device)."""
    from torch.utils.data import DataLoader

    from chexfound.data.datasets import ImageDataset, collate_skip_errors

    t_start = time.perf_counter()
    device = resolve_device(device)
    rank, world = D.rank(), D.world_size()
    if not paths:
        raise ChexfoundError("no images to embed")
    depth = len(model.blocks)  # type: ignore[arg-type]
    if not 1 <= settings.n_blocks <= depth:
        raise ChexfoundError(f"n_blocks {settings.n_blocks}: the backbone has {depth} blocks")
    if settings.batch_size < 1 or settings.chunk_size < 1:
        raise ChexfoundError("batch size and chunk size must be positive")
    for s in sinks:
        s.open(rank)
    D.barrier()
    batches = _plan(len(paths), settings, sinks, rank, world)
    total = sum(len(r) for _, r in batches)
    log.info("rank %d/%d: %d images to compute in %d batches", rank, world, total, len(batches))
    run = EngineRun(results=[])
    was_training = model.training
    timings = {"prepare_model": 0.0, "wait_for_data": 0.0, "to_device_and_forward": 0.0, "to_sinks": 0.0}
    if batches:
        t = time.perf_counter()
        fast = prepare_backbone(model, device, settings.inference())
        fwd = _forward_fn(fast, device, settings)
        if settings.inference().static_shapes:  # compile / capture now, so the throughput figures exclude it
            size = int(transform.size)
            with torch.inference_mode():
                fwd(torch.zeros(settings.batch_size, 3, size, size, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        timings["prepare_model"] = time.perf_counter() - t
        flip = any(s.wants_flip for s in sinks)
        tdtype = settings.transfer_dtype(device)
        dataset = ImageDataset([str(p) for p in paths], partial(transform.prepare, dtype=tdtype))
        loader = DataLoader(dataset, batch_sampler=[r for _, r in batches], collate_fn=collate_skip_errors,
                            num_workers=settings.workers, pin_memory=device.type == "cuda",
                            persistent_workers=False)
        remaining: dict[int, int] = {}
        for c, r in batches:
            remaining[c] = remaining.get(c, 0) + len(r)
        bar = None
        if progress and rank == 0 and total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True)
        chunk_t0, chunk_images = time.perf_counter(), 0
        # Every rank logs its own chunks (rows carry the rank); no log without a path.
        chunk_log = RunLog(metrics or Path("metrics.jsonl"), enabled=metrics is not None)
        it = iter(loader)
        with torch.inference_mode():
            for c, rows in batches:
                t = time.perf_counter()
                batch = next(it)
                timings["wait_for_data"] += time.perf_counter() - t
                if batch["errors"]:
                    errs = [(int(i), str(p), str(why)) for i, p, why in batch["errors"]]
                    for s in sinks:
                        s.add_errors(c, errs)
                if "image" in batch:
                    t = time.perf_counter()
                    b = batch["image"].shape[0]
                    x = batch["image"].to(device, non_blocking=True)
                    if settings.inference().static_shapes:
                        x = _pad(x, settings.batch_size)
                    x = transform.normalise(x)
                    tokens = fwd(x)
                    if flip and getattr(fwd, "reuses_outputs", False):  # a CUDA graph replay would overwrite them
                        tokens = tuple((p.clone(), cl.clone()) for p, cl in tokens)
                    flipped = fwd(x.flip(-1)) if flip else None
                    if x.shape[0] != b:
                        tokens = tuple((p[:b], cl[:b]) for p, cl in tokens)
                        flipped = None if flipped is None else tuple((p[:b], cl[:b]) for p, cl in flipped)
                    out = Batch(batch["index"].numpy(), tokens, flipped)
                    out.pooled()  # moves to the CPU: the forward is done (and timed) here
                    timings["to_device_and_forward"] += time.perf_counter() - t
                    t = time.perf_counter()
                    for s in sinks:
                        s.add(c, out)
                    timings["to_sinks"] += time.perf_counter() - t
                    run.images += b
                    chunk_images += b
                remaining[c] -= len(rows)
                if bar is not None:
                    bar.update(len(rows))
                if remaining[c] == 0:
                    t = time.perf_counter()
                    for s in sinks:
                        s.commit(c)
                    timings["to_sinks"] += time.perf_counter() - t
                    run.computed_chunks += 1
                    dt = time.perf_counter() - chunk_t0
                    chunk_log.write("chunk", rank=rank, chunk=c, images=chunk_images, seconds=round(dt, 3),
                                    images_per_s=round(chunk_images / dt, 3) if dt else None)
                    chunk_t0, chunk_images = time.perf_counter(), 0
        if bar is not None:
            bar.close()
        model.train(was_training)
    D.barrier()
    if rank == 0:
        t = time.perf_counter()
        run.results = [s.finish() for s in sinks]
        timings["finish"] = time.perf_counter() - t
    run.seconds = time.perf_counter() - t_start
    run.timings = {k: round(v, 4) for k, v in timings.items()}
    return run


def embed_paths(
    model: nn.Module,
    transform: Any,
    paths: Sequence[str],
    ids: Sequence[str],
    out: str | Path,
    settings: EmbedSettings,
    device: torch.device | str = "cpu",
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> EmbedResult | None:
    """Embed `paths` into the pooled-features file `out` (.safetensors/.npz). Returns the result on rank 0
    (None on other ranks). `meta` is stored in the file (backbone identity, transform, ...)."""
    if len(paths) != len(ids):
        raise ValueError("paths and ids differ in length")
    meta = dict(meta or {})
    writer = PooledFileWriter(out, [str(p) for p in paths], [str(i) for i in ids], n_blocks=settings.n_blocks,
                              chunk_size=settings.chunk_size, feature_dtype=settings.feature_dtype,
                              autocast=settings.autocast, meta=meta, keep_parts=settings.keep_parts,
                              settings=asdict(settings))
    run = run_engine(model, transform, paths, [writer], settings, device, progress, metrics=writer.metrics_path)
    if not run.results:
        return None
    result: EmbedResult = run.results[0]
    result.computed_chunks = run.computed_chunks
    result.seconds = run.seconds
    result.timings = run.timings
    return result


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")
