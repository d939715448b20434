"""`chexfound convert RUN/teacher_checkpoint.pth` builds exactly the model that was pretrained, for
every pretraining preset's architecture: inside the run folder (our config.yaml), copied elsewhere (the
architecture travels inside the file), and for older exports without it (config.yaml in the run folder, or
else the head count must be given - never guessed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ckpt_layouts import randomise
from chexfound.cli.main import main
from chexfound.models import VisionTransformer, create_backbone
from chexfound.models.format import META_KEY
from chexfound.ssl.checkpoint import export_teacher
from chexfound.ssl.config import dump_config, list_presets, load_config
from chexfound.ssl.meta_arch import backbone_config

# Small enough for a CPU test: tiny crops, and the 12- and 24-block presets cut to 2 blocks. What differs
# between the presets' architectures is kept: head count, width, registers, LayerScale, GELU MLP vs SwiGLU.
_SHRINK = {"chexfound_vitl16_512": ["student.overrides.depth=2"], "continue_vitl16_512": ["student.overrides.depth=2"],
           "proof_vits16_224": ["student.overrides.depth=2"]}


def _run_folder(preset: str, root: Path) -> tuple[Path, VisionTransformer]:
    """A finished pretraining run of `preset` as `pretrain` leaves it: config.yaml + both teacher exports."""
    cfg = load_config(preset, ["crops.global_crops_size=32", *_SHRINK.get(preset, [])])
    vit_cfg = backbone_config(cfg, drop_path=False)
    teacher = randomise(VisionTransformer(vit_cfg), seed=len(preset))  # LayerScale gammas and all: not identity
    run = root / preset
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    sd = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    sd["teacher.dino_head.last_layer.weight_v"] = torch.randn(8, 4)
    export_teacher(run, sd, vit_cfg, int(cfg["checkpoint"]["export_block_chunks"]),
                   {"preset": cfg["_preset"], "iterations": 5})
    return run, teacher


def _features(model: torch.nn.Module) -> list[torch.Tensor]:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.get_intermediate_layers(x, n=2, return_class_token=True)
    return [t for pair in out for t in pair]


def _same_features(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for fa, fb in zip(_features(a), _features(b), strict=True):
        torch.testing.assert_close(fa, fb, atol=1e-6, rtol=0)


def _convert(src: Path, out: Path, *extra: str) -> int:
    return main(["convert", str(src), "--out", str(out), "--quiet", *extra])


@pytest.mark.slow  # every preset at full size (ViT-B, ViT-L): minutes on 2 cores
@pytest.mark.parametrize("preset", list_presets())
def test_export_convert_gives_the_same_model(preset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, teacher = _run_folder(preset, tmp_path)
    ours = create_backbone(run / "teacher_backbone.safetensors")
    _same_features(ours, teacher)
    expected_name = ours.info.name
    assert expected_name == teacher.cfg.name and ours.info.provenance().startswith(f"pretrained with preset {preset}")

    # 1. In the run folder.
    assert _convert(run / "teacher_checkpoint.pth", tmp_path / "in_run.safetensors") == 0
    in_run = create_backbone(tmp_path / "in_run.safetensors")
    _same_features(in_run, ours)
    assert in_run.cfg.num_heads == teacher.cfg.num_heads and in_run.info.name == expected_name

    # 2. Copied elsewhere: the file describes itself.
    lone = tmp_path / "elsewhere" / "teacher_checkpoint.pth"
    lone.parent.mkdir()
    shutil.copy(run / "teacher_checkpoint.pth", lone)
    assert _convert(lone, tmp_path / "lone.safetensors") == 0
    converted = create_backbone(tmp_path / "lone.safetensors")
    _same_features(converted, ours)
    assert converted.info.name == expected_name and converted.info.provenance() == ours.info.provenance()

    # 3. An export from before the file described itself, in its run folder: our config.yaml is read.
    legacy = torch.load(run / "teacher_checkpoint.pth", weights_only=True)
    assert legacy.pop(META_KEY)["config"]["num_heads"] == teacher.cfg.num_heads
    torch.save(legacy, run / "teacher_checkpoint.pth")
    assert _convert(run / "teacher_checkpoint.pth", tmp_path / "legacy_run.safetensors") == 0
    _same_features(create_backbone(tmp_path / "legacy_run.safetensors"), ours)

    # 4. ... copied elsewhere: nothing says the head count, so it is asked for, not guessed.
    torch.save(legacy, lone)
    assert _convert(lone, tmp_path / "guess.safetensors") == 2
    err = capsys.readouterr().err
    assert str(lone) in err and "number of attention heads cannot be read" in err and "--num-heads" in err
    assert not (tmp_path / "guess.safetensors").exists()
    assert _convert(lone, tmp_path / "told.safetensors", "--num-heads", str(teacher.cfg.num_heads)) == 0
    _same_features(create_backbone(tmp_path / "told.safetensors"), ours)


def test_run_names_derived_models_after_their_preset() -> None:
    demo = backbone_config(load_config("demo_tiny"))
    assert demo.name == "demo_tiny" and demo.extra["derived_from"] == "vits16_224"
    assert demo.extra["overrides"]["embed_dim"] == 128 and demo.extra["overrides"]["img_size"] == 64
    # The released recipe builds the registry model unchanged: it keeps the registry's name.
    assert backbone_config(load_config("chexfound_vitl16_512")).name == "chexfound_vitl16_reg4_512"
