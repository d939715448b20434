"""Lower precision keeps every head's heatmap: a CLS-attention map (non-GLoRI heads) is read through a hook on
the last attention layer, which packed bf16/int8 blocks do not call, so that block stays eager."""

from __future__ import annotations

import numpy as np
import pytest

from chexfound.adapt.heads import head_class
from chexfound.models import create_backbone
from chexfound.serve.predictor import Predictor


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_cls_attention_maps_survive_lower_precision(kind: str, precision: str) -> None:
    bb = create_backbone("tiny_vit", seed=0)
    head = head_class(kind)(findings=["a", "b"], n_blocks=1, embed_dim=bb.embed_dim)
    img = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    ref = Predictor(bb, head).predict_image(img)
    got = Predictor(bb, head, precision=precision, allow_slow_precision=True).predict_image(img)
    assert ref.attention is not None and got.attention is not None
    assert got.attention.shape == ref.attention.shape
    np.testing.assert_allclose(got.attention, ref.attention, atol=1e-2)
    np.testing.assert_allclose(got.probabilities, ref.probabilities, atol=2e-2)
