"""The packed CPU inference path computes what the plain model computes."""

from __future__ import annotations

import pytest
import torch

from ckpt_layouts import tiny
from chexfound.models.fast import pack_for_inference, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="oneDNN packing ops not in this torch build")


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_vit_mlp"])
@pytest.mark.parametrize("size", [64, 96])
def test_packed_matches_plain(name: str, size: int) -> None:
    model = tiny(name, layerscale_init=1e-5) if name == "tiny_vit_mlp" else tiny(name)
    fast = pack_for_inference(model)
    assert fast is not model and fast.blocks[0].__class__.__name__ == "PackedBlock"
    x = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        a = model.get_intermediate_layers(x, 2, return_class_token=True)
        b = fast.get_intermediate_layers(x, 2, return_class_token=True)
        for (pa, ca), (pb, cb) in zip(a, b):
            torch.testing.assert_close(pb, pa, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cb, ca, atol=1e-5, rtol=1e-5)
        fa, fb = model.forward_features(x, return_attention=True), fast.forward_features(x, return_attention=True)
        torch.testing.assert_close(fb["attention"], fa["attention"], atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model.get_intermediate_layers(x, 1, return_class_token=True)[0][1]
        half = pack_for_inference(model, torch.bfloat16).get_intermediate_layers(x, 1, return_class_token=True)[0][1]
        torch.testing.assert_close(half, auto, atol=0.1, rtol=0.05)
    # The original model is untouched and the packed one refuses autograd.
    assert model.blocks[0].__class__.__name__ == "Block"
    with pytest.raises(RuntimeError, match="inference only"):
        fast(x)


def test_chunked_attention_is_exact_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bf16 CPU path's attention: query chunks of full softmax rows, the same function as SDPA."""
    import torch.nn.functional as F

    from chexfound.models import fast as fast_mod

    g = torch.Generator().manual_seed(0)
    for b, h, n, d in [(2, 3, 37, 16), (1, 4, 130, 8)]:
        q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
        want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)  # [B, N, C] out
        monkeypatch.setattr(fast_mod, "_SCORE_TILE_BYTES", h * n * 4 * 20)  # 16-row chunks, a ragged last one
        torch.testing.assert_close(fast_mod.chunked_attention(q, k, v, d**-0.5), want, atol=1e-5, rtol=1e-5)
        monkeypatch.undo()
        torch.testing.assert_close(fast_mod.chunked_attention(q, k, v, d**-0.5), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_vit_mlp"])
def test_packed_bf16_is_as_close_to_fp32_as_autocast(name: str) -> None:
    """bf16 tolerance, measured rather than guessed: the packed bf16 model's error against fp32 is no larger
    than what bf16 autocast of the plain model makes (x1.5)."""
    model = tiny(name, layerscale_init=1.0) if name == "tiny_vit_mlp" else tiny(name)
    with torch.no_grad():
        for b in model.blocks:
            if hasattr(b.ls1, "gamma"):
                b.ls1.gamma.uniform_(0.5, 1.5)
                b.ls2.gamma.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        exact = torch.cat([c for _, c in model.get_intermediate_layers(x, 2, return_class_token=True)], 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = torch.cat([c.float() for _, c in model.get_intermediate_layers(x, 2, return_class_token=True)], 1)
        fast = pack_for_inference(model, torch.bfloat16)
        half = torch.cat([c.float() for _, c in fast.get_intermediate_layers(x, 2, return_class_token=True)], 1)
    err_auto = ((auto - exact).norm() / exact.norm()).item()
    err_fast = ((half - exact).norm() / exact.norm()).item()
    assert 0 < err_fast <= 1.5 * err_auto, (err_fast, err_auto)
