"""Curation speed: decode+hash+resize throughput (1 and 2 worker processes) and near-duplicate search cost
as the corpus grows (10^3, 10^4 real-like hashes; a simulated 10^6), against the quadratic all-pairs
reference measured in the same process. Runs in about 1-2 minutes on 2 CPU cores.

    python bench/curate.py [--data ../shared/data] [--images 96] [--no-million]
    python bench/curate.py --smoke     # seconds: 8 images, 10^2 and 10^3 hashes (checks the code paths)

Real images: nih14 (512 px PNG) and nih14-fullres (1024 px PNG) from the shared data folder.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Stopwatch  # noqa: E402

from chexfound.curate.image_cache import CacheConfig, WorkItem, chunks, process_chunk  # noqa: E402
from chexfound.curate.hashing import PHASH_BITS, words_to_bits  # noqa: E402
from chexfound.curate.index import brute_pairs, near_pairs  # noqa: E402
from chexfound.curate.spec import DedupSpec  # noqa: E402

THRESHOLD = DedupSpec().phash_threshold


def _items(data: Path, n: int) -> list[WorkItem]:
    files = sorted((data / "nih14" / "images").glob("*.png"))[: n - n // 8] + \
        sorted((data / "nih14-fullres" / "images").glob("*.png"))[: n // 8]
    return [WorkItem(f"b/{k}", str(p), f"cache/{k}.png") for k, p in enumerate(files)]


def throughput(items: list[WorkItem], workers: int, cfg: CacheConfig) -> float:
    """Images/s of decode + exact hash + pHash + resize + PNG write, workers already started."""
    with tempfile.TemporaryDirectory() as tmp:
        if workers == 0:
            process_chunk(items[:2], cfg, tmp, None)  # warm imports and caches
            with Stopwatch() as sw:
                for ch in chunks(items, 8):
                    process_chunk(ch, cfg, tmp, None)
            return len(items) / sw.seconds
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(process_chunk, [items[:1]] * workers, [cfg] * workers, [tmp] * workers, [None] * workers))
            with Stopwatch() as sw:
                list(pool.map(process_chunk, list(chunks(items, 8)),
                              *zip(*[(cfg, tmp, None)] * math.ceil(len(items) / 8))))
            return len(items) / sw.seconds


def uniform_hashes(n: int, rng: np.random.Generator, dup_frac: float = 0.01) -> np.ndarray:
    """Random 256-bit hashes with `dup_frac` planted near-copies (<= 8 bits flipped)."""
    w = rng.integers(0, 2 ** 63, size=(n, PHASH_BITS // 64), dtype=np.int64).astype(np.uint64)
    w ^= rng.integers(0, 2, size=w.shape).astype(np.uint64) << np.uint64(63)
    k = int(n * dup_frac)
    src, dst = rng.integers(0, n, k), rng.integers(0, n, k)
    w[dst] = w[src]
    bit = rng.integers(0, PHASH_BITS, size=(k, 8))
    for c in range(rng.integers(1, 9)):
        w[dst, bit[:, c] // 64] ^= np.uint64(1) << (np.uint64(63) - (bit[:, c] % 64).astype(np.uint64))
    return w


def cxr_like_hashes(n: int, seeds: np.ndarray, rng: np.random.Generator, flips: int = 40) -> np.ndarray:
    """Hashes clustered like real chest X-rays: real CXR pHashes with `flips` random bits changed (distinct
    images; real distinct CXRs are >= ~34 bits apart), so buckets are as uneven as on real data."""
    bits = words_to_bits(seeds[rng.integers(0, len(seeds), n)])
    idx = np.argsort(rng.random((n, PHASH_BITS)), axis=1)[:, :flips]
    np.put_along_axis(bits, idx, 1 - np.take_along_axis(bits, idx, 1), 1)
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64)


def search_cost(w: np.ndarray, brute: bool) -> dict:
    st: dict = {}
    with Stopwatch() as sw:
        i, _, _ = near_pairs(w, THRESHOLD, stats=st)
    out = {"n": len(w), "index_s": sw.seconds, "candidates": st["candidates"], "pairs": len(i),
           "plan": st["plan"].describe()}
    if brute:
        with Stopwatch() as sw:
            bi, _, _ = brute_pairs(w, THRESHOLD)
        out["brute_s"] = sw.seconds
        assert len(bi) == len(i), "index and brute force disagree"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("CHEXFOUND_DATA",
                                                     str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--no-million", action="store_true", help="skip the simulated 10^6 search")
    ap.add_argument("--smoke", action="store_true", help="seconds: 8 images, 10^2 and 10^3 hashes, no 10^6")
    args = ap.parse_args()
    sizes = (10**3, 10**4)
    if args.smoke:
        args.images, args.no_million, sizes = 8, True, (10**2, 10**3)
    data = Path(args.data)
    rng = np.random.default_rng(0)

    print(f"== decode + hash + resize(512) + PNG, {args.images} real NIH images (1/8 at 1024 px), "
          f"{os.cpu_count()} CPUs")
    items = _items(data, args.images)
    cfg = CacheConfig(size=512)
    ref = throughput(items, 0, cfg)
    print(f"in-process (reference): {ref:7.1f} images/s")
    for wk in (1, 2):
        r = throughput(items, wk, cfg)
        print(f"{wk} worker process(es): {r:7.1f} images/s  ({r / ref:.2f}x in-process)")

    print(f"\n== near-duplicate search, Hamming <= {THRESHOLD} on {PHASH_BITS}-bit pHashes")
    from chexfound.curate.hashing import hex_to_words, phash
    from chexfound.io import read_image

    seeds = hex_to_words([phash(read_image(it.path).pixels) for it in items])
    rows = []
    for n in sizes:
        for kind, w in (("uniform", uniform_hashes(n, rng)), ("cxr-like", cxr_like_hashes(n, seeds, rng))):
            r = search_cost(w, brute=True)
            r["kind"] = kind
            rows.append(r)
    if not args.no_million:
        r = search_cost(uniform_hashes(10**6, rng), brute=False)
        r["kind"] = "uniform (simulated)"
        rows.append(r)
    print(f"{'hashes':>9} {'kind':>20} {'index s':>9} {'all-pairs s':>12} {'candidates':>11} {'pairs':>7}  plan")
    for r in rows:
        bs = f"{r['brute_s']:.3f}" if "brute_s" in r else "-"
        print(f"{r['n']:>9} {r['kind']:>20} {r['index_s']:>9.3f} {bs:>12} {r['candidates']:>11} {r['pairs']:>7}  "
              f"{r['plan']}")
    uni = {r["n"]: r for r in rows if r["kind"].startswith("uniform")}
    b4 = uni[sizes[1]]["brute_s"] * (10**4 / sizes[1]) ** 2  # all-pairs at 10^4 (measured, or scaled as N^2)
    if 10**6 in uni:
        grow = math.log(uni[10**6]["index_s"] / uni[10**3]["index_s"]) / math.log(1000)
        print(f"\nindex time grows as N^{grow:.2f} from 10^3 to 10^6 (all-pairs: N^2); all-pairs at 10^6 "
              f"extrapolated from 10^4: {b4 * 1e4:.0f} s vs index {uni[10**6]['index_s']:.1f} s "
              f"({b4 * 1e4 / uni[10**6]['index_s']:.0f}x)")
    cand = {r["n"]: r["candidates"] for r in rows if r["kind"] == "cxr-like"}
    print(f"cxr-like candidates grow {cand[sizes[1]] / max(cand[sizes[0]], 1):.1f}x for 10x hashes (all-pairs: 100x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
