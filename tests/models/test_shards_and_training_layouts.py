"""Backbone shards are a backbone format `create_backbone` reads; training-checkpoint layouts and the
position-embedding resize of progressive resolution live in models/ (one of each)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from chexfound.errors import CheckpointError
from chexfound.models import create_backbone
from chexfound.models.loaders.keys import training_state_sides
from chexfound.models.shards import find_shards, load_backbone_shards, save_backbone_shards
from chexfound.models.vit import resize_pos_embed


@pytest.fixture
def vit() -> nn.Module:
    return create_backbone("tiny_vit", seed=3)


def test_create_backbone_reads_a_shard_folder_and_any_one_shard(vit: nn.Module, tmp_path: Path) -> None:
    files = save_backbone_shards(vit, tmp_path / "bf16", 0.25, {"ssl": {"note": "x"}})
    assert len(files) > 1 and all(f.stat().st_size <= 0.25 * 2**20 for f in files)
    want = {k: v.to(torch.bfloat16).float() for k, v in vit.state_dict().items()}
    for where in (tmp_path / "bf16", files[1]):
        model = create_backbone(where)
        assert model.info.format == "chexfound_shards" and model.cfg == vit.cfg
        assert model.info.origin["ssl"] == {"note": "x"} and model.info.source_dtypes == ["bfloat16"]
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=0)
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(model(x), vit.eval()(x), atol=0.05, rtol=0.05)  # bf16 weights
    assert load_backbone_shards(tmp_path / "bf16")[1]["n_shards"] == len(files)
    files[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{len(files) - 1} shard files, expected {len(files)}"):
        create_backbone(tmp_path / "bf16")


def test_ordinary_weights_are_not_taken_for_shards(vit: nn.Module, tmp_path: Path) -> None:
    from chexfound.models import save_backbone

    save_backbone(vit, tmp_path / "b.safetensors")
    assert find_shards(tmp_path) is None and find_shards(tmp_path / "b.safetensors") is None
    (tmp_path / "x.01-of-02.safetensors").write_bytes(b"not safetensors")  # a name alone does not make a shard
    assert find_shards(tmp_path / "x.01-of-02.safetensors") is None


def test_training_layouts_give_student_and_teacher(tmp_path: Path) -> None:
    w = torch.ones(2)
    ours = {"model": {"student.backbone.blocks.0.norm1.weight": w, "teacher.backbone.blocks.1.0.norm1.weight": w,
                      "teacher.module.dino_head.mlp.0.weight": w, "dino_loss.center": w}}
    sides = training_state_sides(ours, tmp_path / "ck.pt")
    assert list(sides["student"]) == ["backbone.blocks.0.norm1.weight"]
    assert sorted(sides["teacher"]) == ["backbone.blocks.0.norm1.weight", "dino_head.mlp.0.weight"]  # un-chunked
    released = {"teacher": {"backbone.blocks.0.0.attn.qkv.weight": w, "ibot_head.last_layer.weight": w}}
    sides = training_state_sides(released, tmp_path / "teacher_checkpoint.pth")
    assert sides["student"] == sides["teacher"] and "backbone.blocks.0.attn.qkv.weight" in sides["teacher"]
    with pytest.raises(CheckpointError, match=r"other\.pt: unknown checkpoint layout"):
        training_state_sides({"weights": {}}, tmp_path / "other.pt")


def test_next_stage_resizes_pos_embed_as_the_backbone_does() -> None:
    from chexfound.ssl.init_source import _resize_pos

    holder = nn.Module()
    holder.backbone = create_backbone("tiny_vit", seed=0)  # 4x4 grid, DINO offset 0.1
    pos = torch.randn(1, 1 + 9, 64)
    got = _resize_pos(holder, pos, 4)
    assert got.shape == (1, 17, 64) and math.isclose(holder.backbone.cfg.interpolate_offset, 0.1)
    torch.testing.assert_close(got, resize_pos_embed(pos, (4, 4), 0.1, False))
    assert not torch.allclose(got, resize_pos_embed(pos, (4, 4), 0.0, False))  # not the plain size-based resize
