"""Adapters, not copies: LoRA / BitFit fine-tunes saved as what they changed, loaded onto their own base only."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from chexfound.adapt import LinearHead
from chexfound.adapt.adapter import Adapter, adapter_from_model, apply_adapter, load_adapter, save_adapter
from chexfound.adapt.finetune import LoRALinear, apply_lora, finetune, lora_delta
from chexfound.errors import CheckpointError
from chexfound.models import backbone_sha256, create_backbone, save_backbone
from chexfound.models.format import save_tensors


@pytest.mark.parametrize("mode", ["lora", "bitfit"])
def test_finetune_adapter_reloads_onto_its_base_exactly(tiny_backbone, nih_paths, tmp_path, mode):
    y = np.array([[1], [0], [1], [0]], dtype=np.float32)
    make = lambda: LinearHead(["x"], 2, "binary", embed_dim=64)  # noqa: E731
    tuned, res = finetune(copy.deepcopy(tiny_backbone), make, nih_paths[:4], y, mode=mode, lr=1e-2, epochs=1,
                          batch_size=4, device="cpu", augment=False)
    assert res.adapter_tensors
    ad = Adapter(mode, res.adapter_tensors, backbone_sha256(tiny_backbone), backbone_sha256(tuned), lora=res.lora)
    save_adapter(ad, tmp_path / "a.safetensors")
    save_backbone(tuned, tmp_path / "full.safetensors")
    # what it saves is a fraction of the backbone
    assert (tmp_path / "a.safetensors").stat().st_size < 0.5 * (tmp_path / "full.safetensors").stat().st_size
    back = apply_adapter(tiny_backbone, load_adapter(tmp_path / "a.safetensors"))
    assert backbone_sha256(back) == backbone_sha256(tuned) == back.info.weights_sha256
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), tuned(x), rtol=0, atol=0)


def test_an_adapter_refuses_another_base(tiny_backbone, tmp_path):
    lora = copy.deepcopy(tiny_backbone)
    apply_lora(lora, r=2, alpha=2)
    save_adapter(adapter_from_model(lora, "lora", backbone_sha256(tiny_backbone)), tmp_path / "a.safetensors")
    torch.manual_seed(7)
    other = create_backbone("tiny_vit")
    with pytest.raises(CheckpointError, match=r"a\.safetensors.*trained on the backbone with weights SHA-256 "
                                              + backbone_sha256(tiny_backbone)[:12]):
        apply_adapter(other, load_adapter(tmp_path / "a.safetensors"))


def test_lora_unmerged_equals_merged_and_merge_is_bitwise_reproducible(tiny_backbone):
    lora = copy.deepcopy(tiny_backbone)
    apply_lora(lora, r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g))
    ad = adapter_from_model(lora.eval(), "lora", backbone_sha256(tiny_backbone))
    wrapped, merged = apply_adapter(tiny_backbone, ad, merge=False), apply_adapter(tiny_backbone, ad)
    assert any(isinstance(m, LoRALinear) for m in wrapped.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), lora(x), rtol=0, atol=0)
        torch.testing.assert_close(merged(x), lora(x), rtol=1e-4, atol=1e-5)
    assert backbone_sha256(apply_adapter(tiny_backbone, ad)) == backbone_sha256(merged)
    a, b = torch.randn(4, 64, generator=g), torch.randn(192, 4, generator=g)
    torch.testing.assert_close(lora_delta(a, b, 2.0), (b @ a) * 2.0, rtol=1e-5, atol=1e-5)


def test_broken_adapter_files_are_named(tiny_backbone, tmp_path):
    save_backbone(tiny_backbone, tmp_path / "bb.safetensors")
    with pytest.raises(CheckpointError, match="expected an adapter file"):
        load_adapter(tmp_path / "bb.safetensors")
    save_tensors(tmp_path / "half.safetensors", {"blocks.0.attn.qkv.lora_a": torch.zeros(2, 64)},
                 {"kind": "adapter", "method": "lora", "base_sha256": "0" * 64, "lora": {"r": 2, "alpha": 2}})
    with pytest.raises(CheckpointError, match=r"half\.safetensors.*A matrices without B"):
        load_adapter(tmp_path / "half.safetensors")
