"""Benchmark: images/s for reading + transforming real CXR files to the 512-px model input, and how many
data-loader workers it takes to keep a ViT-L/16-512 (the CheXFound backbone) fed.

    python bench/io.py                      # ~1-2 min on 2 CPU cores
    python bench/io.py --model-img-s 350    # workers needed for a model throughput you measured elsewhere
    python bench/io.py --full-model         # time the real 24-block model instead of extrapolating
    python bench/io.py --smoke              # seconds: one image per format, a 1-block model (checks the code)

Each loader worker is one process with one torch thread, so the per-format img/s printed here is what one
`--workers` process delivers. The model's img/s is measured in the same process (default: a 4-block
model of ViT-L width at 512 px, scaled to 24 blocks: every block costs the same, and the patch embedding
and final norm are <1% of the work), so the worker count is a ratio of two numbers from this machine.
Data: ../shared/data (or $CHEXFOUND_DATA); files re-encoded from real ones are marked with *.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from _timing import CPU, best_seconds, rate  # noqa: E402

from chexfound.data.transform import InputTransform  # noqa: E402
from chexfound.io import read_image  # noqa: E402
from chexfound.models.registry import get_config  # noqa: E402
from chexfound.models.vit import VisionTransformer  # noqa: E402

SIZE = 512


def data_root() -> Path:
    return Path(os.environ.get("CHEXFOUND_DATA", REPO.parent / "shared" / "data")).resolve()


def file_sets(root: Path, tmp: Path) -> list[tuple[str, list[Path]]]:
    """(label, files) per format: real files, plus 16-bit PNG and 1024-px JPEG re-encoded from real pixels
    (the shared data has no 16-bit PNG, and its JPEGs are 224 px)."""
    d = root / "dicom"
    nih = sorted((root / "nih14-fullres" / "images").glob("*.png"))[:12]
    kermany = sorted((root / "kermany" / "dataset" / "test" / "PNEUMONIA").glob("*.jpeg"))[:40]
    jpg1024 = []
    for p in nih[:8]:
        q = tmp / f"{p.stem}.jpg"
        Image.open(p).save(q, quality=95)
        jpg1024.append(q)
    png16 = tmp / "rg1_16bit.png"
    Image.fromarray(read_image(d / "RG1_UNCR.dcm", apply_voi=False).to_uint8().astype(np.uint16) * 128 + 5).save(png16)
    return [
        ("PNG 8-bit 1024 px (NIH)", nih),
        ("PNG 16-bit 1955x1841*", [png16]),
        ("JPEG 224 px (Kermany)", kermany),
        ("JPEG 1024 px* (NIH)", jpg1024),
        ("DICOM uncompressed 1955x1841", [d / "RG1_UNCR.dcm"]),
        ("DICOM ACR-NEMA 440 px", [d / "CR-MONO1-10-chest.dcm"]),
        ("DICOM implicit VR 1024 px", sorted(d.glob("nih_gcp_*.dcm"))),
        ("DICOM JPEG baseline 1024 px", sorted(d.glob("siim_*.dcm")) + [d / "Fake_MONOHR1.dcm"]),
        ("DICOM JPEG 2000 lossless", [d / "RG1_J2KR.dcm"]),
        ("DICOM JPEG 2000 lossy", [d / "RG1_J2KI.dcm"]),
    ]


def loader_rate(files: list[Path], tf: InputTransform, seconds: float, min_images: int) -> tuple[float, str]:
    """Images/s of what one loader worker does (one torch thread): read_image + the CPU half of the input
    transform (resize, crop, min-max) to uint8; normalisation runs on the model's device."""
    img = read_image(files[0])  # warm-up: imports, decoder initialisation
    tf.prepare(img.pixels, torch.uint8)
    shape = "x".join(map(str, img.shape))
    # CPU time of this thread: one core's rate, not inflated by other jobs on a shared machine.
    it = iter(range(1 << 62))

    def one() -> None:
        x = tf.prepare(read_image(files[next(it) % len(files)]).pixels, torch.uint8)
        assert x.shape == (1, SIZE, SIZE)

    return rate(one, seconds, min_calls=min_images, clock=CPU), shape


def model_rate(full: bool, batch: int, repeats: int, depth: int = 4) -> tuple[float, str]:
    """Forward img/s of ViT-L/16-512 in inference mode (fp32 on CPU), measured or extrapolated by depth."""
    cfg = get_config("chexfound_vitl16_reg4_512")
    depth = cfg.depth if full else depth
    model = VisionTransformer(replace(cfg, depth=depth)).eval()
    x = torch.randn(batch, 3, SIZE, SIZE)
    with torch.inference_mode():
        dt = best_seconds(lambda: model(x), iters=repeats, warmup=1)
    per_image_full = dt / batch * (cfg.depth / depth)
    how = (f"{cfg.depth} blocks measured" if full
           else f"{depth} of {cfg.depth} blocks measured, scaled x{cfg.depth / depth:g}")
    return 1.0 / per_image_full, f"batch {batch}, {torch.get_num_threads()} threads, fp32, {how}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="time per format (default 3 s)")
    ap.add_argument("--min-images", type=int, default=3, help="at least this many images per format")
    ap.add_argument("--model-img-s", type=float, default=None,
                    help="model throughput to feed (img/s); default: measured here on this CPU")
    ap.add_argument("--full-model", action="store_true", help="time all 24 blocks (slow on CPU)")
    ap.add_argument("--batch", type=int, default=1, help="model batch size for the CPU measurement")
    ap.add_argument("--repeats", type=int, default=1, help="timed model forwards after one warm-up")
    ap.add_argument("--smoke", action="store_true", help="seconds: one image per format, a 1-block model")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seconds, args.min_images, args.repeats, args.full_model = 0.0, 1, 1, False

    root = data_root()
    if not (root / "dicom").is_dir():
        print(f"shared data not found at {root}; set CHEXFOUND_DATA", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    tf = InputTransform(size=SIZE)
    rates: list[tuple[str, float]] = []
    print(f"read_image + InputTransform({SIZE}).prepare (uint8) in one process, 1 torch thread (= one loader worker)")
    print(f"{'format':34s} {'source px':>11s} {'img/s':>8s} {'ms/img':>8s}")
    with tempfile.TemporaryDirectory() as tmpdir:
        torch.set_num_threads(1)
        for label, files in file_sets(root, Path(tmpdir)):
            r, shape = loader_rate(files, tf, args.seconds, args.min_images)
            rates.append((label, r))
            print(f"{label:34s} {shape:>11s} {r:8.1f} {1000 / r:8.1f}")
        torch.set_num_threads(threads)

    if args.model_img_s is not None:
        model_ips, how = args.model_img_s, "given with --model-img-s"
    else:
        model_ips, how = model_rate(args.full_model, args.batch, args.repeats, depth=1 if args.smoke else 4)
    print(f"\nViT-L/16-512 forward: {model_ips:.3f} img/s ({how})")
    print(f"{'format':34s} {'loader/model':>12s} {'workers needed':>15s}")
    for label, r in rates:
        print(f"{label:34s} {r / model_ips:12.1f} {max(1, math.ceil(model_ips / r)):15d}")
    worst = min(rates, key=lambda t: t[1])
    print(f"\nslowest format ({worst[0]}): {max(1, math.ceil(model_ips / worst[1]))} worker(s) keep the model fed; "
          f"for a GPU, rerun with --model-img-s <its measured img/s>.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
