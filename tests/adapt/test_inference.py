"""predict(): the same outputs from a cache, from live features and from a features tuple; NaN for bad rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chexfound.adapt import GloriHead, predict
from chexfound.adapt.token_cache import FeatureCache


def test_predict_from_cache_matches_features_and_handles_bad_rows(tmp_path, tiny_backbone, nih_paths):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"x")
    cache = FeatureCache.build(tiny_backbone, [nih_paths[0], bad, nih_paths[1]], tmp_path / "c", n_blocks=2,
                               flip_tta=True)
    torch.manual_seed(0)
    head = GloriHead(["a", "b", "c"], 2, embed_dim=64, decoder_dim=16, num_heads=2, ffn_dim=16)
    probs, attn = predict(head, cache, return_attention=True, batch_size=1)
    assert probs.shape == (3, 3) and attn.shape == (3, 2, 3, 16)
    assert torch.isnan(probs[1]).all() and not torch.isnan(probs[[0, 2]]).any()
    direct = predict(head, cache.features([0, 2]))
    torch.testing.assert_close(probs[[0, 2]], direct)
    assert ((probs[[0, 2]] > 0) & (probs[[0, 2]] < 1)).all()
    # Flip TTA: the mean of the two views.
    tta = predict(head, cache, flip_tta=True, indices=[2])
    flipped = predict(head, cache.features([2], flip=True))
    torch.testing.assert_close(tta, (direct[1:] + flipped) / 2)
    with pytest.raises(ValueError, match="flip"):
        predict(head, cache.features([0]), flip_tta=True)
    assert np.isclose(attn[0].sum(-1).numpy(), 1.0, atol=1e-5).all()
