"""Heatmaps for every head: a linear head's exact patch shares, the CLS attention of the last block otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from chexfound.adapt import GloriHead, LinearHead, MLPHead
from chexfound.adapt.attribution import (
    CLS_ATTENTION,
    GLORI_ATTENTION,
    LINEAR_CONTRIBUTION,
    LastBlockInput,
    heatmap_kind,
    patch_contributions,
)
from chexfound.models import create_backbone

FINDINGS = ["a", "b", "c"]


def _features(backbone: nn.Module, n_blocks: int) -> tuple:
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return backbone.get_intermediate_layers(x, n=n_blocks, return_class_token=True)


def test_linear_patch_contributions_sum_to_the_mean_patch_logit_term() -> None:
    torch.manual_seed(0)
    bb = create_backbone("tiny_vit").eval()
    head = LinearHead(FINDINGS, n_blocks=2, embed_dim=bb.embed_dim, avgpool=True).eval()
    nn.init.normal_(head.linear.weight, std=0.3)
    nn.init.normal_(head.linear.bias, std=0.3)
    feats = _features(bb, 2)
    with torch.no_grad():
        logits, _ = head(feats)
        shares = patch_contributions(head, feats[-1][0])  # [B, C, N]
        # The logit without its mean-patch term: the same head with the patch weights zeroed.
        cls_only = LinearHead(FINDINGS, n_blocks=2, embed_dim=bb.embed_dim, avgpool=True).eval()
        cls_only.load_state_dict(head.state_dict())
        cls_only.linear.weight[:, -bb.embed_dim:] = 0
        rest, _ = cls_only(feats)
    n_patches = feats[-1][0].shape[1]
    assert shares.shape == (2, len(FINDINGS), n_patches)
    torch.testing.assert_close(shares.sum(-1), logits - rest, rtol=1e-5, atol=1e-5)
    assert (shares.std(-1) > 0).all()  # a real map over the patches, not a constant
    assert heatmap_kind(head) == LINEAR_CONTRIBUTION


def test_kinds_per_head() -> None:
    assert heatmap_kind(GloriHead(FINDINGS, n_blocks=1, embed_dim=32, decoder_dim=16, num_heads=2,
                                  ffn_dim=16)) == GLORI_ATTENTION
    assert heatmap_kind(LinearHead(FINDINGS, n_blocks=1, embed_dim=32)) == CLS_ATTENTION  # CLS only: no patches
    assert heatmap_kind(MLPHead(FINDINGS, n_blocks=1, embed_dim=32, avgpool=True, hidden_dim=8)) == CLS_ATTENTION


def test_cls_attention_leaves_registers_out_and_matches_the_block() -> None:
    torch.manual_seed(0)
    bb = create_backbone("tiny_vit").eval()
    hook = LastBlockInput(bb)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = bb.forward_features(x, return_attention=True)
        cls = hook.cls_attention()
    hook.remove()
    full = out["attention"][:, :, 0]  # [B, heads, T]: the last block's own softmax, CLS row
    r = bb.num_register_tokens
    n = out["x_norm_patchtokens"].shape[1]
    assert cls.shape == (2, n)
    torch.testing.assert_close(cls, full[:, :, 1 + r:].mean(1), rtol=1e-5, atol=1e-6)
    assert hook.cls_attention() is None  # used once: never a stale map


def test_classifier_draws_cls_attention_for_a_cls_only_head() -> None:
    from chexfound.serve.bundle import Classifier

    torch.manual_seed(0)
    bb = create_backbone("tiny_vit").eval()
    c = Classifier(bb, LinearHead(FINDINGS, n_blocks=2, embed_dim=bb.embed_dim).eval())
    assert c.heatmap_kind == CLS_ATTENTION
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        probs, maps = c(x)
        out = bb.forward_features(x, return_attention=True)
    assert maps.shape == (2, len(FINDINGS), 4, 4)
    expected = out["attention"][:, :, 0, 1 + bb.num_register_tokens:].mean(1).reshape(2, 4, 4)
    for k in range(len(FINDINGS)):  # one map, the same for every finding
        torch.testing.assert_close(maps[:, k], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_predictor_still_draws_cls_attention() -> None:
    from chexfound.serve.predictor import Predictor

    torch.manual_seed(0)
    bb = create_backbone("tiny_vit").eval()
    head = LinearHead(FINDINGS, n_blocks=2, embed_dim=bb.embed_dim).eval()
    x = torch.randn(2, 3, 64, 64)
    _, eager = Predictor(bb, head, device="cpu").predict_tensor(x)
    _, fast = Predictor(bb, head, device="cpu", compile=True).predict_tensor(x)
    assert fast is not None  # the hooked last block runs uncompiled
    np.testing.assert_allclose(fast, eager, atol=1e-5)
