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
