"""`chexfound embed` on real NIH images with tiny_vit: values, bad files, resume, manifest, torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chexfound.cli.main import main
from chexfound.data.transform import InputTransform
from chexfound.errors import ChexfoundError
from chexfound.io import read_image
from chexfound.models import create_backbone
from chexfound.models.embedder import EmbedSettings, embed_paths, parts_dir
from chexfound.models.pooled_file import linear_input, read_features

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def images(data_root: Path, tmp_path: Path) -> list[str]:
    """Five real NIH images plus one truncated PNG (in tmp)."""
    real = sorted((data_root / "nih14" / "images").glob("*.png"))[:5]
    bad = tmp_path / "broken.png"
    bad.write_bytes(real[0].read_bytes()[:300])
    return [str(p) for p in real[:3]] + [str(bad)] + [str(p) for p in real[3:]]


def random_tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone("tiny_vit")


def test_embed_values_and_skipped_file(images: list[str], tmp_path: Path) -> None:
    out = tmp_path / "feats.safetensors"
    rc = main(["embed", *images, "--config", "tiny_vit", "--out", str(out), "--batch-size", "2", "--chunk-size", "3",
               "--quiet"])
    assert rc == 0
    f = read_features(out)
    good = [p for p in images if "broken" not in p]
    assert f["path"] == good and f["index"].tolist() == [0, 1, 2, 4, 5]
    assert f["cls"].shape == (5, 2, 64) and f["patch_mean"].shape == (5, 64) and f["cls"].dtype == np.float32
    assert [s[1] for s in f["meta"]["skipped"]] == [images[3]]
    assert "broken.png" in (tmp_path / "feats.skipped.csv").read_text()
    assert not parts_dir(out).exists()
    # The stored features are the backbone's outputs on the standard transform of each image.
    model = random_tiny().eval()
    tf = InputTransform.for_backbone(model.cfg)
    x = torch.stack([tf(read_image(p).pixels) for p in good[:2]])
    with torch.no_grad():
        outs = model.get_intermediate_layers(x, 2, return_class_token=True)
    np.testing.assert_allclose(f["cls"][:2, 1], outs[1][1].numpy(), atol=1e-5)
    np.testing.assert_allclose(f["cls"][:2, 0], outs[0][1].numpy(), atol=1e-5)
    np.testing.assert_allclose(f["patch_mean"][:2], outs[1][0].mean(1).numpy(), atol=1e-5)
    assert linear_input(f, 2, avgpool=True).shape == (5, 3 * 64)
    assert main(["embed", *images, "--config", "tiny_vit", "--out", str(tmp_path / "s.npz"), "--strict",
                 "--quiet"]) == 1


def test_embed_resumes_after_interruption(images: list[str], tmp_path: Path) -> None:
    good = [p for p in images if "broken" not in p]
    ids = [Path(p).name for p in good]
    settings = EmbedSettings(n_blocks=2, batch_size=1, chunk_size=2)
    model = random_tiny().eval()
    tf = InputTransform.for_backbone(model.cfg)
    reference = embed_paths(model, tf, good, ids, tmp_path / "ref.npz", settings, progress=False)
    assert reference is not None and reference.computed_chunks == 3

    calls = {"n": 0}
    real_forward = model.get_intermediate_layers

    def dies_on_fifth_batch(*a: object, **k: object) -> object:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_forward(*a, **k)

    model.get_intermediate_layers = dies_on_fifth_batch  # type: ignore[method-assign]
    out = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        embed_paths(model, tf, good, ids, out, settings, progress=False)
    assert sorted(q.name for q in parts_dir(out).glob("chunk*")) == ["chunk000000.safetensors", "chunk000001.safetensors"]
    model.get_intermediate_layers = real_forward  # type: ignore[method-assign]
    again = embed_paths(model, tf, good, ids, out, settings, progress=False)
    assert again is not None and again.computed_chunks == 1  # only the unfinished chunk
    a, b = read_features(out), read_features(tmp_path / "ref.npz")
    np.testing.assert_array_equal(a["cls"], b["cls"])
    assert a["image_id"] == ids
    # A rerun of a finished job finds the complete file and computes nothing.
    stamp = out.stat().st_mtime_ns
    third = embed_paths(model, tf, good, ids, out, settings, progress=False)
    assert third is not None and third.computed_chunks == 0 and third.count == 5
    assert out.stat().st_mtime_ns == stamp

    # Parts made with other settings are never mixed in.
    with pytest.raises(KeyboardInterrupt):
        model.get_intermediate_layers = dies_on_fifth_batch  # type: ignore[method-assign]
        calls["n"] = 0
        embed_paths(model, tf, good, ids, tmp_path / "mix.npz", settings, progress=False)
    model.get_intermediate_layers = real_forward  # type: ignore[method-assign]
    with pytest.raises(ChexfoundError, match="different n_blocks"):
        embed_paths(model, tf, good, ids, tmp_path / "mix.npz", EmbedSettings(n_blocks=1, batch_size=1, chunk_size=2),
                    progress=False)


def test_embed_manifest_fp16_and_bf16(images: list[str], tmp_path: Path) -> None:
    # Absolute paths and an image_id column: ids come from the manifest.
    m2 = tmp_path / "rel.csv"
    m2.write_text("path,patient_id,image_id\n" + "\n".join(
        f"{p},{i},img{i}" for i, p in enumerate(x for x in images if "broken" not in x)) + "\n")
    out16 = tmp_path / "f16.safetensors"
    assert main(["embed", "--manifest", str(m2), "--config", "tiny_vit", "--out", str(out16),
                 "--feature-dtype", "float16", "--quiet"]) == 0
    f16 = read_features(out16)
    assert f16["cls"].dtype == np.float16 and f16["image_id"] == [f"img{i}" for i in range(5)]
    outbf = tmp_path / "bf.npz"
    assert main(["embed", "--manifest", str(m2), "--config", "tiny_vit", "--out", str(outbf), "--dtype", "bf16",
                 "--quiet"]) == 0
    fb = read_features(outbf)
    assert fb["meta"]["autocast"] == "bf16"
    np.testing.assert_allclose(fb["cls"], f16["cls"].astype(np.float32), atol=0.1)


@pytest.mark.slow
def test_embed_torchrun_two_ranks(images: list[str], tmp_path: Path) -> None:
    """2 gloo ranks share the chunks; rank 0 merges; the file equals a single-process run."""
    single = tmp_path / "single.npz"
    assert main(["embed", *images, "--config", "tiny_vit", "--out", str(single), "--chunk-size", "2", "--quiet"]) == 0
    out = tmp_path / "multi.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "chexfound", "embed", *images, "--config", "tiny_vit", "--out", str(out), "--chunk-size", "2",
           "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_features(out), read_features(single)
    np.testing.assert_allclose(a["cls"], b["cls"], atol=1e-6)
    assert a["path"] == b["path"] and len(a["meta"]["skipped"]) == 1
