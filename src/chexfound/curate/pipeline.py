"""`run_curation`: spec -> filtered, deduplicated, cached corpus + manifest + duplicates + report.

Stages: list sources -> pre-decode filters (patient exclusion, view, modality, age) -> decode/hash/resize
into the cache (parallel, resumable) -> post-decode filters (blank, size, header view/modality/age) ->
exact and near-duplicate removal -> outputs under DIR:
  manifest.csv     kept images; `path` relative to DIR (the cached PNG), read by `read_manifest`
  duplicates.csv   one row per removed image: its source/path, the kept image it duplicates, the method
  quarantine.csv   files that could not be decoded, with the reason
  filtered.csv     images removed by a filter rule (rule, stage)
  index.csv        tar layout only: shard/member/offset/length of every kept image
  report.md/.html, figures/*.png, summary.json, config.yaml, metrics.jsonl, work/ (resume state)
"""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from os import PathLike
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from chexfound.curate import dedup as dd
from chexfound.curate.image_cache import (RECORDS, CacheConfig, RecordLog, WorkItem, chunks, is_reusable,
                                          process_chunk)
from chexfound.curate.filters import post_filter, pre_filter
from chexfound.curate.keep import keep_rank
from chexfound.curate.sources import list_items
from chexfound.curate.spec import CorpusSpec
from chexfound.errors import ChexfoundError, ConfigError, ManifestError
from chexfound.runio import RunLog, atomic_output, atomic_write_json, resolve_device, write_run_config

log = logging.getLogger(__name__)

STATE = "work/state.json"


@dataclass
class CurateResult:
    out: Path
    complete: bool
    n_items: int = 0
    processed_now: int = 0  # images decoded by this run
    reused: int = 0  # images whose finished record from an earlier run was kept
    n_kept: int = 0
    n_duplicates: int = 0
    n_quarantined: int = 0
    n_filtered: int = 0
    counts: dict[str, Any] = field(default_factory=dict)


def read_exclude(path: str | PathLike[str] | None) -> pd.DataFrame | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ManifestError(p, "exclude list not found")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except Exception as e:
        raise ManifestError(p, f"cannot parse exclude list ({e})") from e
    if "patient_id" not in df.columns:
        if "patient_key" not in df.columns:
            raise ManifestError(p, "exclude list needs a patient_id column (and optionally source); "
                                   f"got {list(df.columns)}")
        df["patient_id"] = df["patient_key"]
    if "source" not in df.columns:
        log.warning("%s has no 'source' column: patient ids are matched in every source", p)
    return df


def _targets(items: pd.DataFrame, fmt: str) -> list[str]:
    """Cache names: <source>/<relative path with .png>; the original extension is kept where two files of
    one folder would otherwise collide (a.jpg and a.png)."""
    base = [str(Path(s) / Path(r).with_suffix("")) for s, r in zip(items["source"], items["rel_path"])]
    clash = pd.Series(base).duplicated(keep=False).to_numpy()
    names = [f"{s}/{r}" if c else b for b, c, s, r in zip(base, clash, items["source"], items["rel_path"])]
    names = [n + ".png" for n in names]
    return [f"cache/{n}" for n in names] if fmt == "png" else names


def _check_state(out: Path, cfg: CacheConfig) -> dict[str, Any]:
    p = out / STATE
    fp = cfg.fingerprint()
    state: dict[str, Any] = {"cache": fp, "runs": 0}
    if p.is_file():
        state = json.loads(p.read_text())
        if state.get("cache") != fp:
            raise ConfigError(p, f"{out} holds a cache built with {state.get('cache')}; this run asks for {fp}. "
                                 "Use another --out, or the same cache settings to resume.")
    state["runs"] = int(state.get("runs", 0)) + 1
    atomic_write_json(p, state, indent=1)
    return state


def _process(pending: list[WorkItem], cfg: CacheConfig, out: Path, records: RecordLog, done: dict[str, dict],
             workers: int, chunk_size: int, run_id: int, stop_after: int | None, progress: bool,
             metrics: RunLog) -> tuple[int, bool]:
    """Decode/hash/cache `pending`; returns (processed, stopped_early)."""
    from tqdm import tqdm

    bar = tqdm(total=len(pending), desc="curate: decode+hash+resize", unit="img", disable=not progress)
    processed, t0, last_log = 0, time.perf_counter(), time.perf_counter()
    work = list(chunks(pending, chunk_size))
    shard_name = (lambda k: f"shards/shard-{run_id:03d}-{k:06d}.tar") if cfg.format == "tar" else (lambda k: None)

    def finish(recs: list[dict]) -> None:
        nonlocal processed, last_log
        records.append(recs)
        for r in recs:
            done[r["key"]] = r
        processed += len(recs)
        bar.update(len(recs))
        now = time.perf_counter()
        if now - last_log > 10 or processed == len(pending):
            metrics.write("stage", stage="cache", done=processed, total=len(pending),
                          images_per_s=round(processed / max(now - t0, 1e-9), 2),
                          errors=sum(r.get("status") != "ok" for r in recs))
            last_log = now

    stopped = False
    try:
        if workers <= 0:
            for k, ch in enumerate(work):
                if stop_after is not None and processed >= stop_after:
                    stopped = True
                    break
                finish(process_chunk(ch, cfg, str(out), shard_name(k)))
        else:
            ctx = get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                inflight: set[Future] = set()
                nxt = 0
                while True:
                    while not stopped and nxt < len(work) and len(inflight) < 2 * workers:
                        inflight.add(pool.submit(process_chunk, work[nxt], cfg, str(out), shard_name(nxt)))
                        nxt += 1
                    if not inflight:
                        break
                    fin, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                    for f in fin:
                        finish(f.result())
                    # the stop hook: submit nothing new, but record what is already running
                    if stop_after is not None and processed >= stop_after and nxt < len(work):
                        stopped = True
    finally:
        bar.close()
    return processed, stopped


def _embeddings(table: pd.DataFrame, idx: np.ndarray, out: Path, spec: CorpusSpec, device: str,
                progress: bool) -> np.ndarray:
    """CLS embeddings of the cached images (resumable via work/embeddings-<backbone sha>.npz)."""
    import torch

    from chexfound.curate.image_cache import decode_png, read_cached
    from chexfound.models import create_backbone
    from chexfound.models.extract import extract_features

    es = spec.dedup.embedding
    assert es is not None
    try:
        model = create_backbone(es.backbone, seed=0)  # the seed matters for a named architecture only
    except ChexfoundError as e:
        raise ConfigError(spec.path, f"dedup.embedding.backbone: {e}") from e
    if model.info.format == "random":  # a registry name without weights: only useful for testing
        log.warning("embedding dedup with randomly initialised %s: pass a trained backbone file", es.backbone)
    dev = resolve_device(device)
    tf = model.info.transform
    cache_file = out / f"work/embeddings-{model.info.weights_sha256[:16]}.npz"
    model = model.to(dev).eval()
    have: dict[str, np.ndarray] = {}
    if cache_file.is_file():
        z = np.load(cache_file, allow_pickle=False)
        have = dict(zip(z["keys"].tolist(), z["emb"]))
    keys = table["key"].to_numpy()[idx]
    todo = [k for k, key in enumerate(keys) if key not in have]
    from tqdm import tqdm

    recs = table.iloc[idx].to_dict("records")
    for s in tqdm(range(0, len(todo), es.batch_size), desc="curate: embeddings", disable=not progress):
        batch = todo[s:s + es.batch_size]
        x = torch.stack([tf.prepare(decode_png(read_cached(out, recs[k]))) for k in batch])
        e = extract_features(model, x, n_blocks=1, transform=tf, device=dev).cls[:, -1]  # the final-norm CLS
        for k, v in zip(batch, e):
            have[keys[k]] = v
    if todo:
        ks = list(have)
        with atomic_output(cache_file) as tmp:
            np.savez(tmp, keys=np.array(ks), emb=np.stack([have[k] for k in ks]))
    return np.stack([have[k] for k in keys]) if len(keys) else np.zeros((0, 1), np.float32)


def run_curation(
    spec: CorpusSpec,
    out: str | PathLike[str],
    exclude: str | PathLike[str] | None = None,
    workers: int = 0,
    stop_after: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    device: str = "auto",
    chunk_size: int | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> CurateResult:
    """Build (or resume) the curated corpus in `out`. `stop_after` stops once that many images have been
    processed by this run (a test hook for interruption); the result then has complete=False."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    note = on_stage or (lambda s: log.info("curate: %s", s))
    cfg = CacheConfig(spec.cache.size, spec.cache.bit_depth, spec.cache.format, spec.cache.upscale,
                      spec.dedup.phash_bits)
    state = _check_state(out, cfg)
    resolved = {"spec": spec.to_dict(), "spec_path": str(spec.path) if spec.path else None,
                "exclude": str(Path(exclude).resolve()) if exclude else None, "workers": workers}
    write_run_config(out / "config.yaml", resolved)
    metrics = RunLog(out / "metrics.jsonl")

    note("listing sources")
    items = list_items(spec, skip=(out,))
    excl = read_exclude(exclude)
    items["rule"] = pre_filter(items, spec.filters, excl)
    items["stage"] = np.where(items["rule"] != "", "pre", "")
    items["target"] = _targets(items, cfg.format)

    records = RecordLog(out / RECORDS)
    done = records.load()
    todo_mask = items["rule"].to_numpy() == ""
    reusable = np.array([is_reusable(done.get(k), p, out, retry_errors) if m else False
                         for k, p, m in zip(items["key"], items["path"], todo_mask)], dtype=bool)
    pending = [WorkItem(k, p, t) for k, p, t, m, r in
               zip(items["key"], items["path"], items["target"], todo_mask, reusable) if m and not r]
    for k in items["key"][todo_mask & ~reusable]:
        done.pop(k, None)  # stale (changed source file, missing output): redone below
    note(f"{len(items)} images listed, {int(todo_mask.sum())} pass the metadata filters, "
         f"{int(reusable.sum())} already cached, {len(pending)} to process")
    if chunk_size is None:
        chunk_size = spec.cache.shard_size if cfg.format == "tar" else (
            1 if workers <= 0 else max(1, min(32, math.ceil(len(pending) / (8 * workers)))))
    processed, stopped = _process(pending, cfg, out, records, done, workers, chunk_size, int(state["runs"]),
                                  stop_after, progress, metrics)
    result = CurateResult(out, complete=not stopped, n_items=len(items), processed_now=processed,
                          reused=int(reusable.sum()))
    if stopped:
        metrics.write("stage", stage="stopped", processed=processed)
        return result

    table = _assemble(items, done, spec)
    note("deduplicating")
    table, dstats = _deduplicate(table, spec, out, device, progress)
    from chexfound.curate.report import write_outputs

    note("writing manifest and report")
    counts = write_outputs(table, spec, out, dstats)
    result.n_kept = int((table["status"] == "kept").sum())
    result.n_duplicates = int((table["status"] == "duplicate").sum())
    result.n_quarantined = int((table["status"] == "quarantined").sum())
    result.n_filtered = int((table["status"] == "filtered").sum())
    result.counts = counts
    metrics.write("stage", stage="done", kept=result.n_kept, duplicates=result.n_duplicates,
                  quarantined=result.n_quarantined, filtered=result.n_filtered, processed=processed,
                  reused=result.reused)
    return result


_REC_COLS = ["orig_width", "orig_height", "width", "height", "exact", "phash", "blank", "file", "member", "offset",
             "length", "reason", "view_position", "modality", "patient_age", "source_format", "lossy", "grey_bits"]


def _assemble(items: pd.DataFrame, done: dict[str, dict], spec: CorpusSpec) -> pd.DataFrame:
    """One row per listed image with its record and a status: filtered | quarantined | ok (so far)."""
    t = items.copy()
    recs = [done.get(k) if r == "" else None for k, r in zip(t["key"], t["rule"])]
    for c in _REC_COLS:
        t["rec_" + c if c in ("modality",) else c] = [r.get(c) if r else None for r in recs]
    status = np.where(t["rule"] != "", "filtered", "ok").astype(object)
    for k, r in enumerate(recs):
        if status[k] != "ok":
            continue
        if r is None or r.get("status") != "ok":
            status[k] = "quarantined"
            if r is not None and not t.at[k, "reason"]:
                t.at[k, "reason"] = r.get("reason")
            continue
        rule = post_filter(r, spec.filters, {"view": t.at[k, "view"], "modality": t.at[k, "modality"],
                                             "age": t.at[k, "age"]})
        if rule:
            status[k] = "filtered"
            t.at[k, "rule"], t.at[k, "stage"] = rule, "post"
    t["status"] = status
    return t


def _deduplicate(t: pd.DataFrame, spec: CorpusSpec, out: Path, device: str, progress: bool
                 ) -> tuple[pd.DataFrame, dict[str, Any]]:
    t = t.copy()
    t["dup_of"], t["dup_method"], t["dup_score"] = "", "", np.nan
    ok = np.nonzero((t["status"] == "ok").to_numpy())[0]
    stats: dict[str, Any] = {"candidates": len(ok)}
    if not len(ok):
        return t, stats
    sub = t.iloc[ok].reset_index(drop=True)
    rank = keep_rank(sub, spec.dedup.keep)
    exact_best = dd.exact_groups(sub["exact"].tolist(), rank) if spec.dedup.exact else None
    survivors = np.nonzero(exact_best == np.arange(len(sub)))[0] if exact_best is not None else np.arange(len(sub))
    edges = []
    if spec.dedup.phash_threshold is not None:
        st: dict[str, Any] = {}
        hashes = sub["phash"].to_numpy()[survivors].tolist()
        edges.append(dd.phash_edges(hashes, survivors, spec.dedup.phash_threshold, st))
        stats.update(phash_plan=st["plan"].describe(), phash_candidates=int(st["candidates"]),
                     phash_pairs=len(edges[-1].i))
    if spec.dedup.embedding is not None:
        emb = _embeddings(sub, survivors, out, spec, device, progress)
        edges.append(dd.embedding_edges(emb, survivors, spec.dedup.embedding.threshold))
        stats.update(embedding_pairs=len(edges[-1].i))
    res = dd.resolve(len(sub), rank, exact_best, edges)
    drop = np.nonzero(~res.keep)[0]
    status = t["status"].to_numpy().copy()
    status[ok] = "kept"
    status[ok[drop]] = "duplicate"
    t["status"] = status
    keys = sub["key"].to_numpy()
    t.loc[ok[drop], "dup_of"] = keys[res.dup_of[drop]]
    t.loc[ok[drop], "dup_method"] = res.method[drop]
    t.loc[ok[drop], "dup_score"] = res.score[drop]
    return t, stats
