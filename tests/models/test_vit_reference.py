"""Our ViT against independently written reference formulas (tests/models/vit_reference.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import vit_reference as ref
from chexfound.models import VisionTransformer, create_backbone, get_config
from chexfound.models.vit import Block, swiglu_hidden


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight away from its init so each term of the forward matters (init has LayerScale 1e-5,
    near-uniform attention and zero biases, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(p.shape[-1] ** -0.5 * torch.randn(p.shape, generator=g) if p.ndim > 1
                        else 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


CASES = ["tiny_vit", "tiny_vit_mlp"]
SIZES = [(64, 64), (96, 96), (48, 48), (64, 96), (80, 48)]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_intermediate_layers_match_reference(name: str, hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = randomise(create_backbone(name))
    cfg = model.cfg
    x = torch.randn(2, 3, *hw)
    n = cfg.depth
    ours = model.get_intermediate_layers(x, n, return_class_token=True)
    theirs = ref.intermediate_layers(x, model.state_dict(), cfg.num_heads, cfg.patch_size, n, cfg.interpolate_offset)
    assert len(ours) == len(theirs) == n
    for (p, c), (rp, rc) in zip(ours, theirs):
        assert p.shape == (2, (hw[0] // 16) * (hw[1] // 16), cfg.embed_dim)
        torch.testing.assert_close(p, rp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, rc, atol=1e-5, rtol=1e-5)


def test_explicit_attention_mode() -> None:
    """explicit_attention() runs the original's op-by-op attention; same numbers as SDPA to fp32 noise."""
    from chexfound.models.vit import explicit_attention

    torch.manual_seed(0)
    model = randomise(create_backbone("tiny_vit"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = model.get_intermediate_layers(x, 2, return_class_token=True)
        with explicit_attention():
            explicit = model.get_intermediate_layers(x, 2, return_class_token=True)
            theirs = ref.intermediate_layers(x, model.state_dict(), 2, 16, 2, 0.1)
        again = model.get_intermediate_layers(x, 2, return_class_token=True)
    for (pf, cf), (pe, ce), (pr, cr), (pa, ca) in zip(fused, explicit, theirs, again):
        torch.testing.assert_close(pe, pf, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ce, cr, atol=1e-5, rtol=1e-5)
        assert torch.equal(pa, pf)  # the mode ends with the block


def test_size_based_resize_without_offset_matches_reference() -> None:
    """interpolate_offset = 0 switches to an explicit output size (input/output ratio as the scale)."""
    torch.manual_seed(1)
    cfg = replace(get_config("tiny_vit"), interpolate_offset=0.0)
    model = randomise(VisionTransformer(cfg))
    x = torch.randn(1, 3, 112, 80)
    (p, c), = model.get_intermediate_layers(x, 1, return_class_token=True)
    (rp, rc), = ref.intermediate_layers(x, model.state_dict(), cfg.num_heads, 16, 1, 0.0)
    torch.testing.assert_close(p, rp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, rc, atol=1e-5, rtol=1e-5)


def test_offset_kludge_changes_the_resize() -> None:
    """The 0.1 offset is not cosmetic: scale_factor (g + 0.1) / M samples other source points than size=g."""
    pos = torch.randn(1, 1 + 16, 8)
    a = ref.resize_pos(pos, 7, 7, 0.1)
    b = ref.resize_pos(pos, 7, 7, 0.0)
    assert (a - b).abs().max() > 1e-3
    from chexfound.models.vit import resize_pos_embed

    torch.testing.assert_close(resize_pos_embed(pos, (7, 7), 0.1, False), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(resize_pos_embed(pos, (7, 7), 0.0, False), b, atol=1e-5, rtol=1e-5)


def test_one_block_at_released_dimensions() -> None:
    """One block with the released model's dims (1024, 16 heads, SwiGLU hidden 2736) vs the formulas."""
    cfg = get_config("chexfound_vitl16_reg4_512")
    blk = randomise(Block(cfg, 0.0), seed=3)
    assert swiglu_hidden(1024, 4.0) == 2736
    assert tuple(blk.mlp.w12.weight.shape) == (5472, 1024) and tuple(blk.mlp.w3.weight.shape) == (1024, 2736)
    x = torch.randn(1, 21, 1024)
    sd = {f"blocks.0.{k}": v for k, v in blk.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref.block(x, sd, 0, 16), atol=1e-5, rtol=1e-5)


def test_released_config_parameter_count() -> None:
    with torch.device("meta"):
        m = create_backbone("chexfound_vitl16_reg4_512")
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 304.6e6) < 0.1e6, n
    assert tuple(m.pos_embed.shape) == (1, 1025, 1024) and tuple(m.register_tokens.shape) == (1, 4, 1024)


def test_attention_maps_and_masked_tokens() -> None:
    torch.manual_seed(2)
    model = randomise(create_backbone("tiny_vit"))
    sd = model.state_dict()
    x = torch.randn(2, 3, 64, 64)
    out = model.forward_features(x, return_attention=True)
    t = ref.prepare_tokens(x, sd, 16, 0.1)
    for i in range(model.cfg.depth - 1):
        t = ref.block(t, sd, i, 2)
    last = f"blocks.{model.cfg.depth - 1}"
    _, a = ref.attention(ref.layer_norm(t, sd[f"{last}.norm1.weight"], sd[f"{last}.norm1.bias"]), sd, last, 2)
    assert out["attention"].shape == (2, 2, 1 + 2 + 16, 1 + 2 + 16)
    torch.testing.assert_close(out["attention"], a, atol=1e-5, rtol=1e-5)
    # Masked patches are replaced by the mask token before CLS and position embedding are added.
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    tok = model.prepare_tokens(x, masks)
    plain = model.prepare_tokens(x)
    pos = sd["pos_embed"][0, 1:]
    r = 1 + model.num_register_tokens
    torch.testing.assert_close(tok[0, r + 1], sd["mask_token"][0] + pos[1])
    torch.testing.assert_close(tok[1], plain[1])
    torch.testing.assert_close(tok[0, r + 2], plain[0, r + 2])


def test_block_selection_and_reshape() -> None:
    torch.manual_seed(0)
    model = randomise(create_backbone("tiny_vit_mlp"))
    x = torch.randn(1, 3, 64, 80)
    by_index = model.get_intermediate_layers(x, [0, 2], return_class_token=True)
    all_blocks = model.get_intermediate_layers(x, 4, return_class_token=True)
    torch.testing.assert_close(by_index[0][0], all_blocks[0][0])
    torch.testing.assert_close(by_index[1][1], all_blocks[2][1])
    grid = model.get_intermediate_layers(x, 1, reshape=True)[0]
    assert grid.shape == (1, 64, 4, 5)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), all_blocks[-1][0])
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, 5)


def test_batch_subset_drop_path_in_training() -> None:
    """Rate > 0.1: the residual reaches only int(B * (1 - p)) samples, scaled by B / kept (as the original)."""
    cfg = replace(get_config("tiny_vit"), drop_path_rate=0.4, drop_path_uniform=True)
    blk = randomise(Block(cfg, 0.4)).train()
    torch.manual_seed(0)
    x = torch.randn(10, 5, 64)
    with torch.no_grad():
        y = blk(x)
    changed = (y - x).abs().flatten(1).amax(1) > 0
    # The FFN subset is drawn independently of the attention subset, so between 6 and 10 samples change.
    assert 6 <= int(changed.sum()) <= 10
    blk.eval()
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref.block(x, {f"blocks.0.{k}": v for k, v in blk.state_dict().items()}, 0, 2))
