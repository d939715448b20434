"""The fast inference paths compute the same function as the eager model: per-block torch.compile (static
shapes, batches padded), SDPA backend selection, and the settings every command shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chexfound.data.transform import InputTransform
from chexfound.models import create_backbone
from chexfound.models.embedder import EmbedSettings, embed_paths
from chexfound.models.inference import (CudaGraphForward, InferenceSettings, compile_blocks, prepare_backbone,
                                        run_context)
from chexfound.models.pooled_file import read_features
from chexfound.models.vit import VisionTransformer


def _model() -> VisionTransformer:
    torch.manual_seed(0)
    m = create_backbone("tiny_vit").eval()
    with torch.no_grad():  # trained-like LayerScale so every branch matters
        for b in m.blocks:
            b.ls1.gamma.uniform_(0.5, 1.5)
            b.ls2.gamma.uniform_(0.5, 1.5)
    return m


@pytest.mark.slow
def test_compiled_blocks_and_compiled_engine_equal_eager(data_root, tmp_path):
    from torch._dynamo.utils import counters

    model = _model()
    x = torch.randn(3, 3, 64, 64)
    fast = compile_blocks(model)
    assert fast.blocks is not model.blocks and fast.patch_embed is model.patch_embed  # parameters shared
    counters.clear()
    with torch.inference_mode():
        want = model.get_intermediate_layers(x, n=2, return_class_token=True)
        got = fast.get_intermediate_layers(x, n=2, return_class_token=True)
    for (gp, gc), (wp, wc) in zip(got, want):
        torch.testing.assert_close(gp, wp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gc, wc, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # one graph serves every block
    # Through the engine: 7 images in batches of 3, the last one padded to the static shape.
    paths = [str(p) for p in sorted((data_root / "nih14" / "images").glob("*.png"))[:7]]
    tf = InputTransform.for_backbone(model.cfg)
    eager = embed_paths(model, tf, paths, paths, tmp_path / "e.npz", EmbedSettings(n_blocks=2, batch_size=3),
                        progress=False)
    compiled = embed_paths(model, tf, paths, paths, tmp_path / "c.npz",
                           EmbedSettings(n_blocks=2, batch_size=3, compile=True), progress=False)
    assert eager is not None and compiled is not None and compiled.count == 7
    a, b = read_features(tmp_path / "e.npz"), read_features(tmp_path / "c.npz")
    np.testing.assert_allclose(b["cls"], a["cls"], atol=1e-5)
    np.testing.assert_allclose(b["patch_mean"], a["patch_mean"], atol=1e-5)


def test_sdpa_backend_choice_and_settings():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    dev = torch.device("cpu")
    with torch.inference_mode():
        with run_context(dev, InferenceSettings(sdpa="auto"))():
            a = model.get_intermediate_layers(x, n=1, return_class_token=True)
        with run_context(dev, InferenceSettings(sdpa="math"))():
            b = model.get_intermediate_layers(x, n=1, return_class_token=True)
    torch.testing.assert_close(a[0][1], b[0][1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sdpa"):
        InferenceSettings(sdpa="fastest")
    with pytest.raises(ValueError, match="compute"):
        InferenceSettings(compute="int4")
    assert InferenceSettings(compile=True).static_shapes and not InferenceSettings().static_shapes
    # CPU: packing by default (a copy; the model itself is untouched), nothing for foreign modules.
    packed = prepare_backbone(model, "cpu", InferenceSettings())
    assert packed is not model and type(packed.blocks[0]).__name__ == "PackedBlock"
    assert type(model.blocks[0]).__name__ == "Block"
    assert prepare_backbone(model, "cpu", InferenceSettings(pack=False)) is model
    wrapped = torch.nn.Sequential(model)
    assert prepare_backbone(wrapped, "cpu", InferenceSettings()) is wrapped
    with pytest.raises(RuntimeError, match="CUDA"):
        CudaGraphForward(model, 1, run_context(dev, InferenceSettings()))(x)


@pytest.mark.slow
def test_compiled_predictor_pads_batches_and_matches_eager(tmp_path):
    from chexfound.adapt import GloriHead
    from chexfound.serve.predictor import Predictor

    model = _model()
    torch.manual_seed(1)
    head = GloriHead(["a", "b"], 2, embed_dim=64, decoder_dim=16, num_heads=2, ffn_dim=16).eval()
    eager = Predictor(model, head, device="cpu")
    fast = Predictor(model, head, device="cpu", compile=True)
    x = torch.randn(3, 3, 64, 64)  # padded to 4 inside, cut back to 3
    pe, me = eager.predict_tensor(x)
    pf, mf = fast.predict_tensor(x)
    assert pf.shape == (3, 2) and mf.shape == me.shape
    np.testing.assert_allclose(pf, pe, atol=1e-5)
    np.testing.assert_allclose(mf, me, atol=1e-5)
