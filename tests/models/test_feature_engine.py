"""The one feature engine: embed once (pooled file + token cache from one pass), adapt from that without a
backbone forward, the uint8 data path, and the shared pooling / linear-probe input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from chexfound.adapt import GloriHead, LinearHead, load_head
from chexfound.adapt.sources import PooledSource, RowSubset, match_rows, open_features
from chexfound.adapt.token_cache import FeatureCache
from chexfound.cli.main import main
from chexfound.data.transform import InputTransform
from chexfound.io import read_image
from chexfound.models import create_backbone
from chexfound.models.embedder import EmbedSettings, embed_paths
from chexfound.models.extract import extract_features
from chexfound.models.format import read_meta
from chexfound.models.pooled import linear_input, linear_input_from_blocks, pool_tokens
from chexfound.models.pooled_file import read_features, read_pooled
from chexfound.models.vit import VisionTransformer

SMALL = ["--decoder-dim", "32", "--ffn-dim", "32", "--num-heads", "2", "--batch-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory, data_root):
    """40 NIH images: all.csv (what is embedded), train.csv / val.csv (what heads train on), relative paths
    in a folder of their own (matched to the embedded rows by resolved path)."""
    df = pd.read_csv(data_root / "nih14" / "labels.csv").head(40)
    df["path"] = [str(data_root / "nih14" / p) for p in df["path"]]
    d = tmp_path_factory.mktemp("m")
    broken = d / "broken.png"
    broken.write_bytes(b"not an image")
    all_rows = pd.concat([df, df.head(1).assign(path=str(broken), patient_id="bad", image_id="broken")])
    all_rows.to_csv(d / "all.csv", index=False)
    pats = sorted(df["patient_id"].unique())
    val_pats = set(pats[::4])
    df[~df["patient_id"].isin(val_pats)].to_csv(d / "train.csv", index=False)
    pd.concat([df[df["patient_id"].isin(val_pats)],
               df.head(1).assign(path=str(broken), patient_id="bad", image_id="broken")]).to_csv(d / "val.csv",
                                                                                              index=False)
    return d


@pytest.fixture(scope="module")
def embedded(manifests, tmp_path_factory):
    """One `chexfound embed` run writing both outputs."""
    out = tmp_path_factory.mktemp("e")
    rc = main(["embed", "--manifest", str(manifests / "all.csv"), "--config", "tiny_vit", "--out",
               str(out / "pooled.safetensors"), "--tokens", str(out / "tokens"), "--flip-tta", "--chunk-size", "16",
               "--batch-size", "8", "--quiet"])
    assert rc == 0
    return out


def test_one_pass_writes_pooled_file_and_token_cache_that_agree(embedded, manifests):
    pooled = read_pooled(embedded / "pooled.safetensors")
    cache = FeatureCache.open(embedded / "tokens")
    assert len(pooled) == 40 and len(cache) == 41 and cache.valid.sum() == 40 and cache.has_flip
    assert cache.errors[0][1].endswith("broken.png")
    view = cache.pooled()
    rows = match_rows(cache, pooled.paths)
    assert (rows >= 0).all()
    # Same forward, same float32 pooling: the file and the cache's pooled view are identical.
    np.testing.assert_array_equal(view.cls[rows], pooled.cls)
    np.testing.assert_array_equal(view.patch_mean[rows], pooled.patch_mean)
    # The token cache holds the backbone's tokens (float16) on the standard transform of each image.
    torch.manual_seed(0)
    model = create_backbone("tiny_vit").eval()
    tf = InputTransform.for_backbone(model.cfg)
    x = torch.stack([tf(read_image(p).pixels) for p in pooled.paths[:3]])
    with torch.no_grad():
        live = model.get_intermediate_layers(x, n=2, return_class_token=True)
    for (gp, gc), (wp, wc) in zip(cache.features(rows[:3]), live):
        torch.testing.assert_close(gp, wp, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(gc, wc, atol=2e-3, rtol=2e-3)
    cls, pm = pool_tokens(live)
    np.testing.assert_allclose(pooled.cls[:3], cls.numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled.patch_mean[:3], pm.numpy(), atol=1e-5)


def test_adapt_trains_from_embed_output_without_running_the_backbone(embedded, manifests, tmp_path, monkeypatch,
                                                                      caplog):
    import chexfound.models.embedder as engine

    def no_backbone(*a, **k):
        raise AssertionError("the backbone ran inside adapt")

    monkeypatch.setattr(engine, "_forward_fn", no_backbone)
    monkeypatch.setattr(VisionTransformer, "get_intermediate_layers", no_backbone)
    out = tmp_path / "run"
    common = ["--train", str(manifests / "train.csv"), "--val", str(manifests / "val.csv"), "--epochs", "2",
              "--lrs", "1e-3,1e-2", "--out", str(out), *SMALL]
    assert main(["adapt", "--features", str(embedded / "tokens"), "--head", "glori", "--heatmaps", "1", *common]) == 0
    head, meta = load_head(out / "glori.safetensors"), read_meta(out / "glori.safetensors")
    cache_meta = json.loads((embedded / "tokens" / "cache.json").read_text())
    assert isinstance(head, GloriHead) and head.n_blocks == 2
    assert meta["backbone_sha256"] == cache_meta["backbone_sha256"] and meta["transform"]["size"] == 64
    assert pd.read_csv(out / "skipped.csv")["path"].str.endswith("broken.png").all()
    assert len(list((out / "heatmaps" / "glori").glob("*.png"))) >= 1
    # Linear heads train on the pooled file itself.
    assert main(["adapt", "--features", str(embedded / "pooled.safetensors"), "--head", "linear", "--avgpool",
                 *common]) == 0
    assert isinstance(load_head(out / "linear.safetensors"), LinearHead)
    assert len(pd.read_csv(out / "linear.val_per_finding.csv")) == 14
    # GLoRI needs tokens: a pooled file is refused with the reason.
    assert main(["adapt", "--features", str(embedded / "pooled.safetensors"), "--head", "glori", *common]) == 2
    # Options of the backbone run that --features replaces are named in a warning, not silently dropped.
    with caplog.at_level(logging.WARNING, logger="chexfound.adapt.pipeline"):
        assert main(["adapt", "--features", str(embedded / "pooled.safetensors"), "--head", "linear", "--dtype", "bf16",
                     "--compile", *common]) == 0
    assert any("--dtype bf16, --compile have no effect with --features" in r.getMessage() for r in caplog.records)
    # Features have the size they were computed at: another --image-size is refused, not ignored.
    assert main(["adapt", "--features", str(embedded / "tokens"), "--head", "linear", "--image-size", "32",
                 *common]) == 2


def test_pooled_source_gives_linear_heads_their_token_input(embedded):
    """A linear head sees the same vector from the pooled file as from the full tokens."""
    cache = FeatureCache.open(embedded / "tokens")
    pooled = PooledSource(cache.pooled())
    head = LinearHead(["a", "b"], 2, embed_dim=64, avgpool=True).eval()
    rows = np.flatnonzero(cache.valid)[:5]
    with torch.no_grad():
        from_tokens = head(cache.features(rows))[0]
        from_pooled = head(pooled.features(rows))[0]
    # Tokens are stored in float16; the pooled view was computed from the float32 tokens.
    torch.testing.assert_close(from_pooled, from_tokens, atol=5e-3, rtol=5e-3)
    sub = RowSubset(pooled, np.array([rows[1], -1, rows[0]]))
    assert sub.valid.tolist() == [True, False, True] and len(sub) == 3
    assert isinstance(open_features(embedded / "pooled.safetensors"), PooledSource)


def test_linear_input_is_one_builder():
    g = torch.Generator().manual_seed(0)
    feats = tuple((torch.randn(4, 9, 8, generator=g), torch.randn(4, 8, generator=g)) for _ in range(3))
    cls, pm = pool_tokens(feats)
    want = torch.cat([feats[1][1], feats[2][1], feats[2][0].mean(1)], dim=1)
    torch.testing.assert_close(linear_input(cls, pm, 2, avgpool=True), want)
    torch.testing.assert_close(linear_input_from_blocks(feats, 2, True), want)
    np.testing.assert_allclose(linear_input(cls.numpy(), pm.numpy(), 2, True), want.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="3 block"):
        linear_input(cls, pm, 4)


def test_uint8_transfer_and_extract_features_match_the_float_path(data_root, tmp_path):
    paths = [str(p) for p in sorted((data_root / "nih14" / "images").glob("*.png"))[:4]]
    torch.manual_seed(0)
    model = create_backbone("tiny_vit").eval()
    tf = InputTransform.for_backbone(model.cfg)
    f32 = embed_paths(model, tf, paths, paths, tmp_path / "f.npz", EmbedSettings(n_blocks=2, transfer="float32"),
                      progress=False)
    u8 = embed_paths(model, tf, paths, paths, tmp_path / "u.npz", EmbedSettings(n_blocks=2, transfer="uint8"),
                     progress=False)
    assert f32 is not None and u8 is not None
    a, b = read_features(tmp_path / "f.npz"), read_features(tmp_path / "u.npz")
    # 8 bits per pixel after min-max (what the original's PIL pipeline has): a small, bounded change.
    rel = np.abs(a["cls"] - b["cls"]).max() / np.abs(a["cls"]).max()
    assert 0 < rel < 0.02
    # In-memory images through extract_features (the pretraining probes' path) give the file's features.
    imgs = torch.stack([tf.prepare(read_image(p).pixels, torch.uint8) for p in paths])
    mem = extract_features(model, imgs, n_blocks=2, transform=tf, batch_size=3)
    np.testing.assert_allclose(mem.cls, b["cls"], atol=1e-5)
    np.testing.assert_allclose(mem.vectors(2, avgpool=True),
                               np.concatenate([b["cls"].reshape(4, -1), b["patch_mean"]], 1), atol=1e-5)


def test_flip_survives_a_forward_that_reuses_its_output_buffers(data_root, tmp_path, monkeypatch):
    """A CUDA graph replay writes into the same output buffers every call (`CudaGraphForward.reuses_outputs`):
    the flipped forward must not overwrite the unflipped tokens before the sinks saw them."""
    import chexfound.models.embedder as engine

    paths = [str(p) for p in sorted((data_root / "nih14" / "images").glob("*.png"))[:3]]
    torch.manual_seed(0)
    model = create_backbone("tiny_vit").eval()
    ref = FeatureCache.build(model, paths, tmp_path / "ref", n_blocks=2, batch_size=4, flip_tta=True)
    plain = engine._forward_fn

    class Reusing:
        reuses_outputs = True

        def __init__(self, fwd):
            self.fwd, self.out = fwd, None

        def __call__(self, x):
            new = self.fwd(x)
            if self.out is None:
                self.out = tuple((p.clone(), c.clone()) for p, c in new)
            for (p, c), (np_, nc) in zip(self.out, new):
                p.copy_(np_)
                c.copy_(nc)
            return self.out

    monkeypatch.setattr(engine, "_forward_fn", lambda *a, **k: Reusing(plain(*a, **k)))
    got = FeatureCache.build(model, paths, tmp_path / "graph", n_blocks=2, batch_size=4, flip_tta=True)
    rows = np.arange(len(paths))
    for flip in (False, True):
        for (pa, ca), (pb, cb) in zip(ref.features(rows, flip=flip), got.features(rows, flip=flip)):
            torch.testing.assert_close(pb, pa)
            torch.testing.assert_close(cb, ca)
