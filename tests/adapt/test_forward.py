"""One backbone + head forward: serve's Classifier, the localisation heatmaps and the demo run this function."""

import torch

from chexfound.adapt import GloriHead, LinearHead
from chexfound.adapt.forward import head_forward
from chexfound.evaluate.protocols.localisation import head_attention_heatmaps
from chexfound.models import create_backbone
from chexfound.serve.bundle import Classifier


def _pair(head_cls, **kw):
    torch.manual_seed(0)
    bb = create_backbone("tiny_vit").eval()
    head = head_cls(["A", "B", "C"], 2, embed_dim=bb.embed_dim, **kw).eval()
    return bb, head, torch.randn(2, 3, bb.cfg.img_size, bb.cfg.img_size)


def test_head_forward_is_the_head_on_the_blocks_it_reads():
    bb, head, x = _pair(GloriHead, decoder_dim=32, ffn_dim=64, num_heads=4)
    with torch.no_grad():
        out = head_forward(bb, head, x)
        feats = bb.get_intermediate_layers(x, n=2, return_class_token=True)
        logits, attn = head(feats)
    assert len(out.features) == 2 and torch.equal(out.features[-1][0], feats[-1][0])
    assert torch.equal(out.logits, logits) and torch.equal(out.attention, attn)


def test_classifier_and_localisation_heatmaps_agree_with_it():
    bb, head, x = _pair(GloriHead, decoder_dim=32, ffn_dim=64, num_heads=4)
    with torch.no_grad():
        out = head_forward(bb, head, x)
        probs, maps = Classifier(bb, head).eval()(x)
    assert torch.allclose(probs, head.probabilities(out.logits.float()))
    g = bb.cfg.img_size // bb.patch_size
    assert torch.allclose(maps, out.attention.float().mean(1).reshape(2, 3, g, g))
    heat = head_attention_heatmaps(bb, head)(x)  # [B, C, S, S] from the same attention
    assert heat.shape == (2, 3, x.shape[-1], x.shape[-1])
    lin_bb, lin, x = _pair(LinearHead, avgpool=True)
    with torch.no_grad():
        p, _ = Classifier(lin_bb, lin).eval()(x)
        assert torch.allclose(p, lin.probabilities(head_forward(lin_bb, lin, x).logits))
