"""Pretraining corpora: sources -> image paths -> uint8 square images, fed by one of two pipelines.

Every image is decoded by `chexfound.io.read_image` (PNG/JPEG/DICOM), its shorter side resized to the
global crop size (antialiased bicubic) and centre-cropped (`InputTransform.geometry`), then stored as uint8
`[1, S, S]`. Both pipelines hand the training loop such uint8 batches; the multi-crop augmentation then runs
batched on the training device (chexfound.ssl.augment).

  preload  the whole corpus decoded once into one uint8 tensor on the training device (GPU memory, or RAM
           on CPU) and cached in the run folder; a step is an index gather. For corpora that fit.
  loader   a DataLoader whose workers decode each step's images; for corpora that do not fit.

Unreadable files never stop a run: they are skipped, counted and listed in <out>/skipped.csv.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from chexfound.data.datasets import ImageDataset, collate_skip_errors
from chexfound.data.manifest import Manifest, patient_split, read_manifest
from chexfound.data.transform import InputTransform
from chexfound.errors import ConfigError, ManifestError
from chexfound.runio import SKIPPED_FILE
from chexfound.ssl import distributed as D
from chexfound.ssl.config import expand_path
from chexfound.ssl.sampler import ShardedStreamSampler

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"}
MANIFEST_NAMES = ("manifest.csv", "labels.csv", "manifest.parquet")


# -- sources ---------------------------------------------------------------------------------------
def _read_any_manifest(path: Path) -> Manifest:
    try:
        return read_manifest(path, labels=[])
    except ManifestError as e:
        if "patient_id" not in str(e):
            raise
        # Pretraining needs only paths: accept image lists without patient ids.
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        df["patient_id"] = df["path"].astype(str)
        return Manifest(df.reset_index(drop=True), path.parent, [], path)


def source_paths(entry: dict[str, Any], default_split: str | None) -> list[Path]:
    """Image paths of one source {path, split?, patient_split?: {fractions, names, seed}}."""
    p = expand_path(entry["path"])
    manifest_file: Path | None = None
    if p.is_file():
        manifest_file = p
    elif p.is_dir():
        manifest_file = next((p / n for n in MANIFEST_NAMES if (p / n).is_file()), None)
    else:
        raise ConfigError(p, "data source not found (expected a folder of images or a manifest file)")
    if manifest_file is None:
        files = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        if not files:
            raise ConfigError(p, f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        return files
    m = _read_any_manifest(manifest_file)
    ps = entry.get("patient_split")
    if ps:
        names = list(ps.get("names", ["dev", "test"]))
        m.df["split"] = patient_split(m.patients(), ps.get("fractions", [0.7, 0.3]), names, int(ps.get("seed", 0)))
    split = entry.get("split", default_split)
    if split and "split" in m.df.columns:
        m = m.split(str(split))
        if not len(m):
            raise ConfigError(manifest_file, f"no rows with split == {split!r}")
    return m.paths()


def corpus_paths(sources: Sequence[dict[str, Any]], default_split: str | None) -> list[Path]:
    if not sources:
        raise ConfigError(None, "no pretraining data: pass --data FOLDER|MANIFEST or set data.sources")
    out: list[Path] = []
    for s in sources:
        out += source_paths(s if isinstance(s, dict) else {"path": s}, default_split)
    return out


# -- image preparation -----------------------------------------------------------------------------
class PrepareImage:
    """CXRImage pixels [H, W] in [0, 1] -> uint8 [1, S, S] (shorter side to S, centre crop)."""

    def __init__(self, size: int) -> None:
        self.geometry = InputTransform(size=size, mode="crop").geometry

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        x = self.geometry(pixels)
        return torch.round(x * 255.0).to(torch.uint8).unsqueeze(0)


@dataclass
class Skipped:
    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, errors: Sequence[tuple[int, str, str]]) -> None:
        self.items += [(p, r) for _, p, r in errors]

    def write(self, where: Path) -> Path:
        """`<run folder>/skipped.csv` (the run-folder contract, `chexfound.runio.write_skipped`). `where` is the run
        folder; a file path inside it (what older callers pass) means its folder. Returns the file."""
        from chexfound.runio import skipped_rows, write_skipped

        folder = where if where.is_dir() or not where.suffix else where.parent
        target = folder / SKIPPED_FILE
        write_skipped(target, skipped_rows("pretrain", self.items))
        return target


def _loader(paths: Sequence[Path], size: int, workers: int, batch: int = 64) -> DataLoader:
    return DataLoader(ImageDataset(paths, PrepareImage(size)), batch_size=batch, shuffle=False,
                      num_workers=workers, collate_fn=collate_skip_errors)


# -- preload ---------------------------------------------------------------------------------------
def _cache_key(paths: Sequence[Path], size: int) -> str:
    h = hashlib.sha256(f"v1:{size}\n".encode())
    for p in paths:
        st = p.stat() if p.exists() else None
        h.update(f"{p}\t{st.st_size if st else -1}\t{int(st.st_mtime) if st else -1}\n".encode())
    return h.hexdigest()[:16]


def decode_all(paths: Sequence[Path], size: int, workers: int, skipped: Skipped,
               progress: bool = False) -> tuple[torch.Tensor, list[int]]:
    """All images as uint8 [N_ok, 1, S, S] (CPU) and the indices (into `paths`) that decoded."""
    out = torch.empty((len(paths), 1, size, size), dtype=torch.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    it: Any = _loader(paths, size, workers)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="decoding images", unit="batch", leave=False)
    for b in it:
        skipped.add(b["errors"])
        if "image" in b:
            out[b["index"]] = b["image"]
            ok[b["index"].numpy()] = True
    keep = np.flatnonzero(ok)
    return out[torch.from_numpy(keep)], keep.tolist()


def load_preloaded(paths: Sequence[Path], size: int, workers: int, cache_dir: Path | None, skipped: Skipped,
                   progress: bool = False) -> torch.Tensor:
    """Decode once (or read the run folder's cache) -> uint8 [N, 1, S, S] on CPU."""
    from chexfound.runio import atomic_output, atomic_write_json

    key = _cache_key(paths, size)
    if cache_dir is not None:
        f, meta_f = cache_dir / f"preload_{key}.npy", cache_dir / f"preload_{key}.json"
        if f.is_file() and meta_f.is_file():
            meta = json.loads(meta_f.read_text())
            skipped.items += [tuple(x) for x in meta["skipped"]]
            return torch.from_numpy(np.load(f))
    images, _ = decode_all(paths, size, workers, skipped, progress)
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output(cache_dir / f"preload_{key}.npy") as tmp:
            np.save(tmp, images.numpy())
        atomic_write_json(cache_dir / f"preload_{key}.json", {"n": len(paths), "size": size, "skipped": skipped.items},
                          indent=None)
    return images


class PreloadedSource:
    """The corpus resident on the training device; batch(step) is an index gather."""

    kind = "preload"

    def __init__(self, images: torch.Tensor, sampler: ShardedStreamSampler, device: torch.device) -> None:
        self.images = images.to(device)
        self.sampler = sampler
        self.device = device

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(self, start_step: int) -> Iterator[tuple[int, torch.Tensor, int]]:
        step = start_step
        while True:
            idx = torch.from_numpy(self.sampler.indices(step)).to(self.device)
            yield step, self.images.index_select(0, idx), 0
            step += 1


class _StepBatches(torch.utils.data.Sampler):
    def __init__(self, sampler: ShardedStreamSampler, start: int) -> None:
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield self.sampler.indices(step).tolist()
            step += 1


class LoaderSource:
    """Workers decode each step's images; corrupt files are dropped from the batch and counted."""

    kind = "loader"

    def __init__(self, paths: Sequence[Path], size: int, sampler: ShardedStreamSampler, device: torch.device,
                 workers: int, skipped: Skipped) -> None:
        self.paths, self.size, self.sampler, self.device = list(paths), size, sampler, device
        self.workers, self.skipped = workers, skipped

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, start_step: int) -> Iterator[tuple[int, torch.Tensor, int]]:
        dl = DataLoader(ImageDataset(self.paths, PrepareImage(self.size)),
                        batch_sampler=_StepBatches(self.sampler, start_step), num_workers=self.workers,
                        collate_fn=collate_skip_errors, pin_memory=self.device.type == "cuda",
                        persistent_workers=self.workers > 0, prefetch_factor=4 if self.workers else None)
        step = start_step
        for b in dl:
            self.skipped.add(b["errors"])
            if "image" not in b:
                log.warning("iteration %d: every image of this rank's batch was unreadable; skipped", step)
                step += 1
                continue
            yield step, b["image"].to(self.device, non_blocking=True), len(b["errors"])
            step += 1


# -- the corpus of a run ------------------------------------------------------------------------------
@dataclass
class Corpus:
    source: PreloadedSource | LoaderSource
    sampler: ShardedStreamSampler
    n_items: int
    pipeline: str  # preload | loader
    skipped: Skipped


def open_corpus(cfg: dict[str, Any], out: Path, info: D.DistInfo, say: Any, quiet: bool) -> Corpus:
    """The run's images, fed by the pipeline `data.pipeline` picks (`auto`: preload when it fits)."""
    d = cfg["data"]
    paths = corpus_paths(d["sources"], d["split"])
    size = int(cfg["crops"]["global_crops_size"])
    b, seed = int(cfg["train"]["batch_size_per_gpu"]), int(cfg["train"]["seed"])
    pipeline = d["pipeline"]
    if pipeline == "auto":
        pipeline = "preload" if len(paths) * size * size / 1e9 <= float(d["preload_max_gb"]) else "loader"
    skipped = Skipped()
    source: PreloadedSource | LoaderSource
    if pipeline == "preload":
        cache = out / "cache" if d["cache"] else None
        # rank 0 decodes (and fills the cache) first; the others then read the cache
        if info.is_main:
            images = load_preloaded(paths, size, int(d["num_workers"]), cache, skipped, progress=not quiet)
        D.barrier()
        if not info.is_main:
            images = load_preloaded(paths, size, int(d["num_workers"]), cache, skipped)
        n_items = images.shape[0]
        if n_items == 0:
            if info.is_main:
                skipped.write(out)  # the file the message points to
            raise ConfigError(None, f"none of the {len(paths)} images could be read (see {out / SKIPPED_FILE})")
        sampler = ShardedStreamSampler(n_items, b, info.world_size, info.rank, seed)
        source = PreloadedSource(images, sampler, info.device)
        del images
    else:
        n_items = len(paths)
        sampler = ShardedStreamSampler(n_items, b, info.world_size, info.rank, seed)
        source = LoaderSource(paths, size, sampler, info.device, int(d["num_workers"]), skipped)
    if info.is_main and skipped.items:
        say(f"skipped {len(skipped.items)} unreadable image(s); listed in {skipped.write(out)}")
    return Corpus(source, sampler, n_items, pipeline, skipped)
