"""GLoRI head: same logits/attention as the original decoder for the same weights; our file round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from chexfound.adapt import GloriHead, LinearHead, MLPHead, load_head, save_head
from chexfound.data.findings import CXRLT24
from chexfound.errors import CheckpointError

from ._reference import RefDecoder


def _features(b=3, n=16, d=32, blocks=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(b, n, d, generator=g), torch.randn(b, d, generator=g)) for _ in range(blocks))


def _randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial LayerNorm/bias values so that a mapping mistake cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _released_file(path, decoders: dict[str, RefDecoder], prefix="classifiers_dict."):
    sd = {}
    for name, dec in decoders.items():
        for k, v in dec.state_dict().items():
            sd[f"{prefix}{name}.decoder.{k}"] = v
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "iteration": 1234}, path)


@pytest.mark.parametrize("cat_cls", [False, True])
def test_released_layout_matches_reference_forward(tmp_path, cat_cls):
    torch.manual_seed(0)
    ref = RefDecoder(n_cls=5, in_dim=4 * 32, d=48, heads=4, ffn=64, cat_cls=cat_cls)
    _randomise(ref)
    ref.eval()
    path = tmp_path / "glori.pth"
    _released_file(path, {"linear:blocks=4:avgpool=False:lr=0_0010000000": ref})
    head = load_head(path, num_heads=4)
    assert isinstance(head, GloriHead) and head.cat_cls == cat_cls and not head.training
    assert head.findings == [f"class_{i}" for i in range(5)]
    feats = _features()
    with torch.no_grad():
        want_logits, want_attn = ref(feats)
        logits, attn = head(feats)
    assert attn.shape == (3, 4, 5, 16)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn, want_attn, rtol=1e-5, atol=1e-6)
    # Deterministic in eval mode; the same forward gives both outputs.
    again = head(feats)
    assert torch.equal(again[0], logits) and torch.equal(again[1], attn)


def test_train_mode_attention_matches_multiheadattention_under_same_dropout_masks():
    """With dropout off the layer must equal torch's MHA arithmetic in training mode too."""
    torch.manual_seed(0)
    ref = RefDecoder(n_cls=3, in_dim=2 * 16, d=32, heads=4, ffn=40)
    head = GloriHead(["a", "b", "c"], n_blocks=2, embed_dim=16, decoder_dim=32, num_heads=4, ffn_dim=40, dropout=0.0)
    sd = {"embed.weight": ref.embed_standart.weight, "embed.bias": ref.embed_standart.bias,
          "queries": ref.query_embed.weight, "class_weight": ref.duplicate_pooling[:, :, 0],
          "class_bias": ref.duplicate_pooling_bias, "thresholds": head.thresholds}
    for k, v in ref.layers[0].state_dict().items():
        sd[f"layer.{k}"] = v
    head.load_state_dict(sd)
    for m in ref.modules():
        if isinstance(m, (torch.nn.Dropout, torch.nn.MultiheadAttention)):
            m.p = 0.0
            m.dropout = 0.0
    feats = _features(n=9, d=16, blocks=2)
    torch.testing.assert_close(head.train()(feats)[0], ref.train()(feats, n=2)[0], rtol=1e-5, atol=1e-5)


def test_forty_classes_default_to_cxrlt_findings_and_several_classifiers_need_a_choice(tmp_path):
    torch.manual_seed(0)
    decs = {f"linear:blocks=4:avgpool=False:lr=0_{i}": RefDecoder(40, 4 * 8, d=16, heads=8, ffn=24) for i in (1, 2)}
    path = tmp_path / "model_final.pth"
    _released_file(path, decs, prefix="module.classifiers_dict.")
    with pytest.raises(CheckpointError, match="2 classifiers"):
        load_head(path)
    h2 = load_head(path, name="linear:blocks=4:avgpool=False:lr=0.2")  # dots as in results json are accepted
    assert h2.findings == list(CXRLT24)
    torch.testing.assert_close(h2.queries, decs["linear:blocks=4:avgpool=False:lr=0_2"].query_embed.weight)
    (tmp_path / "results_eval_linear.json").write_text(
        json.dumps({"iter": 1}) + "\n" + json.dumps({"best_classifier": {"name": "linear:blocks=4:avgpool=False:lr=0_1",
                                                                         "results": {}}}) + "\n{}\n")
    h1 = load_head(path)
    torch.testing.assert_close(h1.queries, decs["linear:blocks=4:avgpool=False:lr=0_1"].query_embed.weight)


def test_released_linear_probe_layout(tmp_path):
    w, b = torch.randn(6, 5 * 8), torch.randn(6)
    name = "classifiers_dict.linear:blocks=4:avgpool=True:lr=0_01"
    torch.save({"model": {f"{name}.linear.weight": w, f"{name}.linear.bias": b}}, tmp_path / "lin.pth")
    head = load_head(tmp_path / "lin.pth")
    assert isinstance(head, LinearHead) and head.avgpool and head.embed_dim == 8
    feats = _features(d=8)
    x = torch.cat([c for _, c in feats] + [feats[-1][0].mean(1)], -1)
    torch.testing.assert_close(head(feats)[0], x @ w.T + b)


class _NotAllowed:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": {"x": _NotAllowed()}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_head(tmp_path / "evil.pth")
    torch.save({"model": {"something.else": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a CheXFound head"):
        load_head(tmp_path / "other.pth")


@pytest.mark.parametrize("make", [
    lambda: GloriHead(["a", "b"], 2, embed_dim=8, decoder_dim=16, num_heads=2, ffn_dim=8, cat_cls=True),
    lambda: GloriHead(["a", "b", "c"], 2, embed_dim=8, decoder_dim=16, num_heads=2, ffn_dim=8,
                      learn_queries=True, coarse_pools=(2,)),
    lambda: GloriHead(["risk"], 2, task="survival", embed_dim=8, decoder_dim=16, num_heads=2, ffn_dim=8),
    lambda: LinearHead(["x"], 2, task="binary", embed_dim=8, avgpool=True),
    lambda: MLPHead(["a", "b", "c"], 2, task="multiclass", embed_dim=8, hidden_dim=12, num_layers=2),
])
def test_our_format_round_trip(tmp_path, make):
    torch.manual_seed(0)
    head = make().eval()
    head.thresholds.fill_(0.3)
    save_head(head, tmp_path / "h.safetensors", backbone_sha256="abc", transform={"size": 64})
    back = load_head(tmp_path / "h.safetensors")
    assert type(back) is type(head) and back.findings == head.findings and back.task == head.task
    feats = _features(n=16, d=8, blocks=2)
    a, b = head(feats), back(feats)
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] is None) == (b[1] is None)
    assert torch.allclose(back.thresholds, torch.full_like(back.thresholds, 0.3))


def test_coarse_attention_is_folded_onto_the_fine_grid():
    torch.manual_seed(0)
    fine = GloriHead(["a", "b"], 2, embed_dim=8, decoder_dim=16, num_heads=2, ffn_dim=8).eval()
    coarse = GloriHead(["a", "b"], 2, embed_dim=8, decoder_dim=16, num_heads=2, ffn_dim=8,
                       coarse_pools=(2, 4)).eval()
    feats = _features(n=16, d=8, blocks=2)
    logits, attn = coarse(feats)
    assert logits.shape == (3, 2) and attn.shape == (3, 2, 2, 16)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 2, 2))
    # The memory holds 16 fine + 4 (2x2 pools) + 1 (4x4 pool) tokens; a k-pooled token's weight is spread
    # over its k*k patches, so the fine-grid map is not just the fine part.
    with torch.no_grad():
        sd = {k: v for k, v in coarse.state_dict().items() if k != "level_embed"}
        fine.load_state_dict(sd)
        assert not torch.allclose(fine(feats)[1], attn)
    with pytest.raises(ValueError, match="does not divide"):
        GloriHead(["a"], 2, embed_dim=8, decoder_dim=16, num_heads=2, ffn_dim=8, coarse_pools=(3,))(feats)


def test_eval_is_deterministic_and_training_uses_dropout():
    torch.manual_seed(0)
    head = GloriHead(["a", "b"], 4, embed_dim=32, decoder_dim=16, num_heads=2, ffn_dim=8, dropout=0.5)
    feats = _features()
    head.train()
    assert not torch.equal(head(feats)[0], head(feats)[0])
    head.eval()
    assert torch.equal(head(feats)[0], head(feats)[0])
