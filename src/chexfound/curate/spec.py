"""The corpus spec (YAML): which sources to pool, how to filter, deduplicate and cache them.
docs/examples/corpus.yaml documents every key; in short:

```yaml
sources:                       # order matters: it is the tie-break of the keep rule
  - {name: nih14, root: ../shared/data/nih14, format: manifest, manifest: labels.csv, patient_column: patient_id}
  - {name: kermany, root: ../shared/data/kermany, format: kermany}      # a reader from chexfound.data.readers
  - {name: extra, root: /some/folder, format: folder, patient_regex: '^(\\d+)_'}
filters: {views: frontal, modalities: [CR, DX], min_size: 256, min_age: 18}
dedup: {exact: true, phash_threshold: 20, keep: quality, embedding: null}
cache: {size: 512, bit_depth: 8, format: png}
report: {samples: 48, pairs: 24, seed: 0}
```
Relative roots resolve against the spec file's folder, then the working directory (so specs written
next to the repo, like the example above, work from either place); `$VARS` and `~` are expanded.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from os import PathLike
from pathlib import Path
from typing import Any

import yaml

from chexfound.curate.keep import KEEP_RULES
from chexfound.errors import ConfigError
from chexfound.runio import apply_overrides as _apply_overrides

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
BUILTIN_FORMATS = ("manifest", "folder")


@dataclass
class SourceSpec:
    name: str
    root: str
    format: str = "manifest"  # manifest | folder | the name of a reader: read_<format> in chexfound.data.readers
    manifest: str | None = None  # manifest file, relative to root (default labels.csv or manifest.csv)
    path_column: str = "path"
    patient_column: str | None = None  # default: patient_id, else patient_key
    image_id_column: str | None = None  # default: image_id if present
    view_column: str | None = None  # default: first of view, ViewPosition, view_position, Projection
    age_column: str | None = None  # default: age / PatientAge
    modality_column: str | None = None  # default: modality / Modality
    patient_regex: str | None = None  # folder format: group 1 of this regex on the relative path
    patient_namespace: str | None = None  # patient ids become "<namespace>:<id>" (default: the source name)
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    limit: int | None = None  # take only the first N images (quick runs)

    @property
    def namespace(self) -> str:
        return self.patient_namespace or self.name


@dataclass
class FilterSpec:
    views: str | list[str] | None = None  # "frontal", "frontal+lateral", "all"/None, or a list of codes
    keep_unknown_view: bool = True
    modalities: list[str] | None = None  # e.g. [CR, DX]; applied where the modality is known
    keep_unknown_modality: bool = True
    min_size: int | None = None  # shorter side of the original image, pixels
    max_size: int | None = None  # longer side of the original image, pixels
    min_age: float | None = None  # years, where known
    max_age: float | None = None
    keep_unknown_age: bool = True
    drop_blank: bool = True  # constant images (all one value) are not radiographs


@dataclass
class EmbeddingSpec:
    backbone: str = ""  # a backbone file (any format chexfound reads) or a named architecture (random weights)
    threshold: float = 0.98  # cosine
    batch_size: int = 32


@dataclass
class DedupSpec:
    exact: bool = True
    # Hamming distance on the 256-bit pHash (null disables near-dup search). Measured on the shared data:
    # resized/JPEG/gamma copies <= ~16, distinct CXRs >= ~34 (same-patient follow-ups are the closest);
    # 20 leaves room both ways, and the search cost rises steeply with it at 10^6 images (bench/curate.py).
    phash_threshold: int | None = 20
    phash_bits: int = 256
    # which copy of a duplicate group is kept (curate/keep.py): quality = lossless, then more pixels, then
    # more grey levels, then source order, then path | largest (pixels first) | source_order (source first)
    keep: str = "quality"
    embedding: EmbeddingSpec | None = None


@dataclass
class CacheSpec:
    size: int = 512  # shorter side after resizing
    bit_depth: int = 8  # 8 or 16 (PNG)
    format: str = "png"  # png (one file per image) | tar (shards of PNGs + index.csv, for streaming)
    upscale: bool = False  # smaller images are stored at their own size unless set
    shard_size: int = 1000  # images per tar shard (and per work chunk)


@dataclass
class ReportSpec:
    samples: int = 48
    pairs: int = 24
    seed: int = 0


@dataclass
class CorpusSpec:
    sources: list[SourceSpec]
    filters: FilterSpec = field(default_factory=FilterSpec)
    dedup: DedupSpec = field(default_factory=DedupSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        for s in d["sources"]:
            s["extensions"] = list(s["extensions"])
        return d


def _build(cls: type, d: Any, where: str, spec_path: Path | None) -> Any:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(spec_path, f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(spec_path, f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ConfigError(spec_path, f"{where}: {e}") from e


def resolve_root(root: str, spec_dir: Path | None) -> Path:
    p = Path(os.path.expandvars(os.path.expanduser(root)))
    if p.is_absolute():
        return p
    if spec_dir is not None and (spec_dir / p).exists():
        return (spec_dir / p).resolve()
    return p.resolve()


def spec_from_dict(d: dict[str, Any], spec_path: Path | None = None) -> CorpusSpec:
    if not isinstance(d, dict) or not d.get("sources"):
        raise ConfigError(spec_path, "corpus spec needs a non-empty 'sources' list")
    unknown = set(d) - {"sources", "filters", "dedup", "cache", "report"}
    if unknown:
        raise ConfigError(spec_path, f"unknown top-level key(s) {sorted(unknown)}; allowed: "
                                     "['cache', 'dedup', 'filters', 'report', 'sources']")
    spec_dir = spec_path.parent if spec_path else None
    sources = []
    for k, s in enumerate(d["sources"]):
        src = _build(SourceSpec, s, f"sources[{k}]", spec_path)
        if not isinstance(src.name, str) or not _NAME_RE.match(src.name):
            raise ConfigError(spec_path, f"sources[{k}]: name {src.name!r} must be letters, digits, '_', '.', '-'")
        src.root = str(resolve_root(str(src.root), spec_dir))
        src.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in src.extensions)
        sources.append(src)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(spec_path, f"source names must be unique, got {names}")
    dd = dict(d.get("dedup") or {})
    emb = dd.pop("embedding", None)
    dedup = _build(DedupSpec, dd, "dedup", spec_path)
    if emb:
        dedup.embedding = _build(EmbeddingSpec, emb if isinstance(emb, dict) else {"backbone": emb},
                                 "dedup.embedding", spec_path)
    spec = CorpusSpec(
        sources=sources,
        filters=_build(FilterSpec, d.get("filters"), "filters", spec_path),
        dedup=dedup,
        cache=_build(CacheSpec, d.get("cache"), "cache", spec_path),
        report=_build(ReportSpec, d.get("report"), "report", spec_path),
        path=spec_path,
    )
    _validate(spec)
    return spec


def _validate(spec: CorpusSpec) -> None:
    p = spec.path
    if spec.cache.bit_depth not in (8, 16):
        raise ConfigError(p, f"cache.bit_depth must be 8 or 16, got {spec.cache.bit_depth}")
    if spec.cache.format not in ("png", "tar"):
        raise ConfigError(p, f"cache.format must be png or tar, got {spec.cache.format!r}")
    if not isinstance(spec.cache.size, int) or spec.cache.size < 8:
        raise ConfigError(p, f"cache.size must be an integer >= 8, got {spec.cache.size!r}")
    if spec.cache.shard_size < 1:
        raise ConfigError(p, "cache.shard_size must be >= 1")
    if spec.dedup.keep not in KEEP_RULES:
        raise ConfigError(p, f"dedup.keep must be one of {sorted(KEEP_RULES)}, got {spec.dedup.keep!r}")
    t = spec.dedup.phash_threshold
    if t is not None and not (0 <= t < spec.dedup.phash_bits // 2):
        raise ConfigError(p, f"dedup.phash_threshold must be in [0, {spec.dedup.phash_bits // 2}), got {t}")
    if spec.dedup.embedding and not spec.dedup.embedding.backbone:
        raise ConfigError(p, "dedup.embedding.backbone is required: a backbone file, or a named architecture "
                             "(random weights: for testing only)")
    if spec.dedup.embedding and not (0 < spec.dedup.embedding.threshold <= 1):
        raise ConfigError(p, "dedup.embedding.threshold must be a cosine in (0, 1]")
    from chexfound.curate.views import parse_views

    try:
        parse_views(spec.filters.views)
    except ValueError as e:
        raise ConfigError(p, f"filters.views: {e}") from e


def apply_overrides(d: dict[str, Any], overrides: list[str] | None, spec_path: Path | None = None) -> dict[str, Any]:
    """`key.sub=value` overrides (`chexfound.runio.apply_overrides`: values are YAML, `1e-3` a float), e.g.
    cache.size=256 dedup.phash_threshold=16; unknown keys are refused when the spec is built."""
    return _apply_overrides(d, overrides or [], source=spec_path)


def load_spec(path: str | PathLike[str], overrides: list[str] | None = None) -> CorpusSpec:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(p, "corpus spec not found")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(p, f"invalid YAML ({e})") from e
    return spec_from_dict(apply_overrides(d or {}, overrides, p), p.resolve())
