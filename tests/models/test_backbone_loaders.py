"""Every foreign layout loads back to the same model; bad files fail with clear errors."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vit_reference as ref
from ckpt_layouts import dinov2_yaml, hf_config, official_teacher, ssl_heads, tiny, to_hf
from chexfound.errors import CheckpointError
from chexfound.models import get_config, save_backbone
from chexfound.models.loaders.infer import same_architecture
from chexfound.models.loaders.official import config_from_dinov2_yaml
from chexfound.models import create_backbone


def load_backbone(path, config=None, **kw):  # the resolver, with the old (model, meta) view for these tests
    model = create_backbone(path, config=config, **kw)
    return model, model.info.to_meta()


def same_outputs(a: torch.nn.Module, b: torch.nn.Module, size: int = 64) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        oa = a.get_intermediate_layers(x, 2, return_class_token=True)
        ob = b.get_intermediate_layers(x, 2, return_class_token=True)
    for (pa, ca), (pb, cb) in zip(oa, ob):
        assert torch.equal(pa, pb) and torch.equal(ca, cb)


@pytest.mark.parametrize("chunks", [2, 0], ids=["chunked", "flat"])
def test_official_teacher_checkpoint(tmp_path: Path, chunks: int) -> None:
    model = tiny("tiny_vit_mlp", layerscale_init=1e-5)
    heads = ssl_heads(64)
    torch.save(official_teacher(model.state_dict(), 4, chunks, heads), tmp_path / "teacher_checkpoint.pth")
    loaded, meta = load_backbone(tmp_path / "teacher_checkpoint.pth", head_dim=16)
    same_outputs(model, loaded)
    assert meta["format"] == "chexfound_official"
    assert set(meta["heads"]) == {"dino_head", "ibot_head"}
    for k, v in heads.items():
        name, rest = k.split(".", 1)
        assert torch.equal(meta["heads"][name][rest], v)
    assert any("chunk" in n for n in meta["notes"]) == bool(chunks)
    assert meta["config"]["interpolate_offset"] == 0.1 and meta["transform"]["minmax_rescale"] is True


def test_module_prefix_and_training_checkpoint(tmp_path: Path) -> None:
    """fvcore model_checkpoint.pth: {"model": {teacher.*, student.*, loss centres}}; DDP `module.` prefixes."""
    teacher, student = tiny("tiny_vit", seed=1), tiny("tiny_vit", seed=2)
    sd = {f"module.teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    sd.update({f"student.backbone.{k}": v for k, v in student.state_dict().items()})
    sd["dino_loss.center"] = torch.zeros(1, 32)
    torch.save({"model": sd, "iteration": 7}, tmp_path / "model_checkpoint.pth")
    loaded, meta = load_backbone(tmp_path / "model_checkpoint.pth", head_dim=32)
    same_outputs(teacher, loaded)
    ignored = " ".join(meta["ignored"])
    assert "student" in ignored and "dino_loss" in ignored and "iteration" in ignored


def test_release_config_yaml_beside_checkpoint(tmp_path: Path) -> None:
    """The release's config.yaml (DINOv2 SSL config) found beside teacher_checkpoint.pth gives the architecture."""
    cfg = replace(get_config("vits16_224"), img_size=32, num_register_tokens=2, ffn_layer="swiglu")
    model = tiny("vits16_224", img_size=32, num_register_tokens=2, ffn_layer="swiglu")
    torch.save(official_teacher(model.state_dict(), 12, 4, {}), tmp_path / "teacher_checkpoint.pth")
    (tmp_path / "config.yaml").write_text(dinov2_yaml(cfg, "vit_small", chunks=4))
    loaded, meta = load_backbone(tmp_path / "teacher_checkpoint.pth")
    assert meta["config_source"].endswith("config.yaml")
    same_outputs(model, loaded, size=32)


def test_release_yaml_describes_the_registered_model() -> None:
    import yaml

    c = get_config("chexfound_vitl16_reg4_512")
    parsed = config_from_dinov2_yaml(yaml.safe_load(dinov2_yaml(c, "vit_large", chunks=4)), "config.yaml")
    assert same_architecture(parsed, c) and parsed.img_size == 512
    assert (parsed.interpolate_offset, parsed.interpolate_antialias) == (0.1, False)
    assert parsed.mean == c.mean and parsed.minmax_rescale


def test_dinov2_pth_and_registry_match(tmp_path: Path) -> None:
    model = tiny("tiny_vit")
    torch.save(model.state_dict(), tmp_path / "dinov2_tiny.pth")
    loaded, meta = load_backbone(tmp_path / "dinov2_tiny.pth", head_dim=32)
    same_outputs(model, loaded)
    assert meta["format"] == "dinov2" and meta["heads"] == {}
    assert "settings of tiny_vit" in meta["config_source"]
    # The head count cannot be seen in the tensors: without it (or a config) the loader refuses to guess and
    # says how to give it; given either way it builds the same model.
    with pytest.raises(CheckpointError,
                       match="number of attention heads cannot be read.*--num-heads.*--head-dim.*--arch") as e:
        load_backbone(tmp_path / "dinov2_tiny.pth")
    assert str(tmp_path / "dinov2_tiny.pth") in str(e.value)
    by_count, _ = load_backbone(tmp_path / "dinov2_tiny.pth", num_heads=2)
    same_outputs(model, by_count)


@pytest.mark.parametrize("variant", ["dinov2_mlp", "with_registers_swiglu"])
def test_hugging_face_dinov2(tmp_path: Path, variant: str) -> None:
    model = tiny("tiny_vit_mlp", layerscale_init=1e-5) if variant == "dinov2_mlp" else tiny("tiny_vit")
    cfg = model.cfg
    hf = to_hf(model.state_dict(), cfg.depth)
    hf["classifier.weight"] = torch.randn(3, 2 * cfg.embed_dim)
    save_file(hf, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg)))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.53] * 3, "image_std": [0.26] * 3}))
    loaded, meta = load_backbone(tmp_path)  # the folder, as downloaded
    same_outputs(model, loaded)
    assert meta["format"] == "hf_dinov2" and meta["config_source"].endswith("config.json")
    assert torch.equal(meta["heads"]["classifier"]["weight"], hf["classifier.weight"])
    assert loaded.cfg.mean == (0.53,) * 3 and not loaded.cfg.minmax_rescale
    # Other sizes: HF resizes by output size (no 0.1 offset); with registers also antialiased.
    assert loaded.cfg.interpolate_offset == 0.0
    assert loaded.cfg.interpolate_antialias == (cfg.num_register_tokens > 0)
    if not cfg.num_register_tokens:
        x = torch.randn(1, 3, 96, 80)
        (p, c), = loaded.get_intermediate_layers(x, 1, return_class_token=True)
        (rp, rc), = ref.intermediate_layers(x, loaded.state_dict(), cfg.num_heads, 16, 1, 0.0)
        torch.testing.assert_close(p, rp, atol=1e-5, rtol=1e-5)


def test_hugging_face_bin_without_mask_token(tmp_path: Path) -> None:
    model = tiny("tiny_vit_mlp", layerscale_init=1e-5)
    hf = to_hf(model.state_dict(), 4)
    del hf["embeddings.mask_token"]
    torch.save({f"dinov2.{k}": v for k, v in hf.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({**hf_config(model.cfg), "use_mask_token": False}))
    loaded, meta = load_backbone(tmp_path / "pytorch_model.bin")
    same_outputs(model, loaded)
    assert torch.count_nonzero(loaded.mask_token) == 0
    # Without the config saying so, a missing mask token is an error like any other key.
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model.cfg)))
    with pytest.raises(CheckpointError, match="missing 1: mask_token"):
        load_backbone(tmp_path / "pytorch_model.bin")


def test_ours_keeps_heads_and_half_precision_source(tmp_path: Path) -> None:
    model = tiny("tiny_vit")
    heads = {"dino_head": {"mlp.0.weight": torch.randn(4, 64)}}
    save_backbone(model, tmp_path / "b.safetensors", heads=heads)
    loaded, meta = load_backbone(tmp_path / "b.safetensors")
    same_outputs(model, loaded)
    assert torch.equal(meta["heads"]["dino_head"]["mlp.0.weight"], heads["dino_head"]["mlp.0.weight"])
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "half.pth")
    half, meta = load_backbone(tmp_path / "half.pth", config="tiny_vit")
    assert meta["source_dtypes"] == ["float16"] and half.pos_embed.dtype == torch.float32


def test_position_embedding_grid_is_resized_with_warning(tmp_path: Path) -> None:
    model = tiny("tiny_vit")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    with pytest.warns(UserWarning, match="4x4 resized to 6x6"):
        big, meta = load_backbone(tmp_path / "w.pth", config=replace(get_config("tiny_vit"), img_size=96))
    assert big.pos_embed.shape == (1, 37, 64) and meta["warnings"]
    same_outputs(model, big, size=96)  # resizing once at load == resizing on the fly


def test_missing_unexpected_and_misshaped_keys(tmp_path: Path) -> None:
    sd = tiny("tiny_vit").state_dict()
    broken = dict(sd)
    del broken["blocks.1.attn.qkv.weight"]
    broken["blocks.1.attn.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as e:
        load_backbone(tmp_path / "broken.pth", config="tiny_vit")
    assert "missing 1: blocks.{1}.attn.qkv.weight" in str(e.value)
    assert "unexpected 1: blocks.{1}.attn.extra.weight" in str(e.value)
    assert str(tmp_path / "broken.pth") in str(e.value)
    torch.save(sd, tmp_path / "ok.pth")
    with pytest.raises(CheckpointError, match=re.escape("missing 28: blocks.{2..3}.attn.proj.bias")):
        load_backbone(tmp_path / "ok.pth", config=replace(get_config("tiny_vit"), depth=4))
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_backbone(tmp_path / "ok.pth", config=replace(get_config("tiny_vit"), mlp_ratio=2.0))


def test_truncated_files(tmp_path: Path) -> None:
    model = tiny("tiny_vit")
    torch.save(model.state_dict(), tmp_path / "full.pth")
    save_backbone(model, tmp_path / "full.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "foreign.safetensors"))
    for name in ("full.pth", "full.safetensors", "foreign.safetensors"):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated|corrupt") as e:
            load_backbone(cut)
        assert str(cut) in str(e.value)


def test_wrong_files_say_what_they_are(tmp_path: Path, data_root: Path) -> None:
    png = next((data_root / "nih14" / "images").glob("*.png"))
    with pytest.raises(CheckpointError, match="PNG image"):
        load_backbone(png)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_backbone(tmp_path / "empty.pth")
    (tmp_path / "notes.yaml").write_text("a: 1\n")
    with pytest.raises(CheckpointError, match="text file"):
        load_backbone(tmp_path / "notes.yaml")
    torch.save(create_backbone("tiny_vit"), tmp_path / "pickled_module.pth")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_backbone(tmp_path / "pickled_module.pth")
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(4, 4, 3, 3)},
               tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="convolutional network.*supported backbone files"):
        load_backbone(tmp_path / "resnet.pth")
    torch.save({"model": {"classifiers_dict.linear:blocks=4.decoder.query_embed.weight": torch.zeros(40, 8)},
                "iteration": 3}, tmp_path / "glori.pth")
    with pytest.raises(CheckpointError, match="classifier head checkpoint"):
        load_backbone(tmp_path / "glori.pth")
    np.savez(tmp_path / "feats.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="NumPy"):
        load_backbone(tmp_path / "feats.npz")
    from chexfound.adapt.heads.linear import LinearHead
    from chexfound.adapt.heads.base import save_head

    head = LinearHead(["A", "B"], 1, "multilabel", 64, False)
    save_head(head, tmp_path / "head.safetensors", backbone_sha256="0", backbone_config={}, transform={})
    with pytest.raises(CheckpointError, match="head file"):
        load_backbone(tmp_path / "head.safetensors")
    no_ffn = {k: v for k, v in create_backbone("tiny_vit").state_dict().items() if ".mlp." not in k}
    torch.save(no_ffn, tmp_path / "no_ffn.pth")
    with pytest.raises(CheckpointError, match="no recognised feed-forward.*loadable architectures"):
        load_backbone(tmp_path / "no_ffn.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone(tmp_path / "nope.pth")
