"""The official CheXFound weights in the Hugging Face Hub layout (`model.safetensors`: `model.`-prefixed teacher
backbone keys, LayerScale as `ls1.weight`) load strictly and compute what the original code computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vit_reference as ref
from ckpt_layouts import tiny, to_chexfound_hub
from chexfound.errors import CheckpointError
from chexfound.models import VisionTransformer, create_backbone, get_config
from chexfound.models.loaders import foreign_architecture, read_foreign
from chexfound.models.loaders.infer import same_architecture
from chexfound.models.loaders.keys import RawStateDict
from chexfound.models.loaders.strict import load_backbone_strict

HUB_NAME = "CheXFound (Hugging Face Hub layout)"


def write_hub(folder: Path, sd: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder / "model.safetensors"


def check_against_original(model: torch.nn.Module, original: dict[str, torch.Tensor], heads: int,
                           size: tuple[int, int]) -> None:
    """get_intermediate_layers (last 2 blocks, normed patches + CLS) vs the reference of the original code,
    whose position embedding is resized on the fly with the release's 0.1 offset."""
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = model.get_intermediate_layers(x, 2, return_class_token=True)
    theirs = ref.intermediate_layers(x, original, heads, 16, 2, offset=0.1)
    for (p, c), (rp, rc) in zip(ours, theirs):
        assert p.shape == rp.shape
        torch.testing.assert_close(p, rp, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(c, rc, atol=2e-5, rtol=1e-5)


def test_small_hub_file_and_folder_match_the_original(tmp_path: Path) -> None:
    original = tiny("tiny_vit", seed=3).state_dict()  # 2 heads, 2 registers, SwiGLU, LayerScale
    hub = to_chexfound_hub(original)
    assert "model.blocks.0.ls1.weight" in hub and "model.blocks.1.mlp.w12.weight" in hub
    # A model.safetensors with a config.json of a schema we do not know: its head count is read, the rest is not.
    f = write_hub(tmp_path / "snap", hub, {"num_heads": 2, "img_size": 64, "some_future_key": {"x": [1]}})
    for spec in (f, f.parent):
        m = create_backbone(spec)
        assert m.info.format == "chexfound_hub" and m.info.format_name == HUB_NAME
        assert m.info.source == str(f) and len(m.info.weights_sha256) == 64
        assert "config.json" in m.info.config_source and m.cfg.num_heads == 2
        assert (m.cfg.interpolate_offset, m.cfg.interpolate_antialias, m.cfg.minmax_rescale) == (0.1, False, True)
        check_against_original(m, original, 2, (64, 64))  # native size
        check_against_original(m, original, 2, (80, 48))  # other, non-square: interpolated position embedding
    assert m.info.describe()["format_name"] == HUB_NAME


def test_small_hub_file_needs_the_head_count(tmp_path: Path) -> None:
    """Shapes that are not the published model's do not say how many heads: asked for, never guessed."""
    original = tiny("tiny_vit", seed=1).state_dict()
    f = write_hub(tmp_path / "a", to_chexfound_hub(original), {"model_type": "chexfound", "architectures": ["X"]})
    with pytest.raises(CheckpointError, match=r"not the published CheXFound ViT-L/16.*--num-heads") as e:
        create_backbone(f)
    assert str(f) in str(e.value)
    m = create_backbone(f, num_heads=2)
    assert m.info.format == "chexfound_hub" and "2 heads as given" in m.info.config_source
    check_against_original(m, original, 2, (64, 64))


# -- the published ViT-L/16-512 shapes, on the meta device (no 1.2 GB file) ---------------------------------------
def vitl_hub() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = VisionTransformer(get_config("chexfound_vitl16_reg4_512"))
    return to_chexfound_hub(model.state_dict())


def recognise(sd: dict[str, torch.Tensor], where: Path) -> tuple[str, object, object]:
    """What `create_backbone(file)` does up to allocating the weights: layout, mapping, architecture, keys."""
    fmt, filt, file_cfg, file_src, optional = read_foreign(where, RawStateDict(tensors=sd))
    cfg, src = foreign_architecture(where, fmt, filt, (None, ""), (file_cfg, file_src))
    return fmt, cfg, (filt, optional)


def test_published_shapes_are_recognised_as_chexfound_vitl16(tmp_path: Path) -> None:
    sd = vitl_hub()
    # The published facts of the file, as its layout builder writes them.
    assert sd["model.pos_embed"].shape == (1, 1025, 1024) and sd["model.register_tokens"].shape == (1, 4, 1024)
    assert sd["model.blocks.0.mlp.w12.weight"].shape == (5472, 1024)
    assert sd["model.patch_embed.proj.weight"].shape == (1024, 3, 16, 16) and "model.mask_token" in sd
    assert "model.blocks.23.ls2.weight" in sd and not any("gamma" in k for k in sd)
    fmt, cfg, _ = recognise(sd, tmp_path / "model.safetensors")
    want = get_config("chexfound_vitl16_reg4_512")
    assert fmt == "chexfound_hub" and same_architecture(cfg, want) and cfg.num_heads == 16  # type: ignore[arg-type]
    assert cfg.name == "chexfound_vitl16_reg4_512" and cfg.img_size == 512  # type: ignore[attr-defined]
    settings = (cfg.interpolate_offset, cfg.interpolate_antialias, cfg.minmax_rescale)  # type: ignore[attr-defined]
    assert settings == (0.1, False, True)


def strict_load(sd: dict[str, torch.Tensor], where: Path) -> None:
    fmt, cfg, (filt, optional) = recognise(sd, where)
    load_backbone_strict(cfg, filt.backbone, where, optional, filt.file_key)  # type: ignore[arg-type,attr-defined]


@pytest.mark.parametrize("change, message", [
    ("drop model.mask_token", r"missing 1: model\.mask_token"),
    ("drop model.blocks.7.mlp.w3.bias", r"model\.blocks\.7\.mlp\.w3\.bias is missing"),
    ("drop model.blocks.0.attn.qkv.bias", r"model\.blocks\.0\.attn\.qkv\.bias is missing"),
    ("drop model.blocks.3.ls1.weight", r"model\.blocks\.3\.ls1\.weight is missing"),
    ("add model.head.weight", r"unexpected 1: model\.head\.weight"),
    ("add model.blocks.4.attn.q_norm.weight", r"unexpected tensor model\.blocks\.4\.attn\.q_norm\.weight"),
    ("add head.weight", r"'head\.weight' is not under 'model\.'"),
    ("shape model.blocks.5.mlp.w12.weight", r"model\.blocks\.5\.mlp\.w12\.weight has shape \[5472, 1000\]"),
    ("shape model.blocks.0.mlp.w3.weight", r"model\.blocks\.0\.mlp\.w3\.weight has shape \[1024, 1000\]"),
    ("shape model.norm.weight", r"model\.norm\.weight: file \(1000,\) vs model \(1024,\)"),
    ("shape model.cls_token", r"model\.cls_token: file \(1, 1, 1000\)"),
])
def test_near_misses_name_the_tensor(tmp_path: Path, change: str, message: str) -> None:
    sd = vitl_hub()
    what, key = change.split(" ")
    if what == "drop":
        del sd[key]
    elif what == "add":
        sd[key] = torch.empty(1024, device="meta")
    else:
        sd[key] = torch.empty(*sd[key].shape[:-1], 1000, device="meta")
    where = tmp_path / "model.safetensors"
    with pytest.raises(CheckpointError, match=message) as e:
        strict_load(sd, where)
    assert str(where) in str(e.value)


def test_other_shapes_in_this_layout_need_num_heads(tmp_path: Path) -> None:
    """3 registers instead of 4: not the published model, so 16 heads are not assumed; a config.json head count
    or the user's is taken."""
    sd = vitl_hub()
    sd["model.register_tokens"] = torch.empty(1, 3, 1024, device="meta")
    where = tmp_path / "model.safetensors"
    with pytest.raises(CheckpointError, match=r"not the published CheXFound ViT-L/16.*num_heads=N / --num-heads N"):
        recognise(sd, where)
    (tmp_path / "config.json").write_text(json.dumps({"arch": "vit_large", "whatever": True}))
    _, cfg, _ = recognise(sd, where)
    assert cfg.num_heads == 16 and cfg.num_register_tokens == 3  # type: ignore[attr-defined]
    # The tensors win over config.json: the published shapes are 16 heads whatever it says.
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 8}))
    with pytest.warns(UserWarning, match="config.json says 8 heads.*the tensors win"):
        _, cfg, _ = recognise(vitl_hub(), where)
    assert cfg.num_heads == 16  # type: ignore[attr-defined]
