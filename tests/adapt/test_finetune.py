"""End-to-end adaptation: LoRA starts at the base model, trains only adapters and merges into plain weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from chexfound.adapt import LinearHead
from chexfound.adapt.finetune import LoRALinear, apply_lora, finetune, merge_lora, random_resized_crop_flip


def test_lora_wraps_attention_and_starts_at_the_base_model(tiny_backbone):
    model = copy.deepcopy(tiny_backbone)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    names = apply_lora(model, r=4, alpha=8)
    assert sorted(names) == sorted(f"blocks.{i}.attn.{n}" for i in range(2) for n in ("qkv", "proj"))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)  # B = 0 at init
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_()
        adapted = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)  # merged == adapter forward
    assert set(model.state_dict()) == set(tiny_backbone.state_dict())


@pytest.mark.parametrize("mode,changed", [("lora", ("attn.qkv.weight", "attn.proj.weight")), ("bitfit", (".bias",))])
def test_finetune_changes_only_what_the_mode_trains(tiny_backbone, nih_paths, mode, changed):
    bb = copy.deepcopy(tiny_backbone)
    y = np.array([[1], [0], [1], [0]], dtype=np.float32)
    make = lambda: LinearHead(["x"], 2, "binary", embed_dim=64)  # noqa: E731
    bb, res = finetune(bb, make, nih_paths[:4], y, nih_paths[4:6], np.array([[1], [0]], np.float32), mode=mode,
                       lr=1e-2, epochs=1, batch_size=4, device="cpu", augment=True)
    assert res.history and res.head.thresholds.shape == (1,) and not bb.training
    before, after = tiny_backbone.state_dict(), bb.state_dict()
    assert set(before) == set(after)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(any(c in k for c in changed) for k in moved)


def test_random_resized_crop_flip_keeps_shape_and_is_seeded():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    a = random_resized_crop_flip(x, torch.Generator().manual_seed(0))
    b = random_resized_crop_flip(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
