"""`create_backbone(name_or_path, checkpoint=None)`: one resolver; every model carries `model.info`."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ckpt_layouts import official_teacher, tiny
from chexfound.errors import CheckpointError, ConfigError
from chexfound.models import ModelInfo, create_backbone, get_config, list_configs, load_backbone, save_backbone
from chexfound.models.format import read_meta

REPO = Path(__file__).resolve().parents[2]


def test_named_architecture_random_weights_seeded() -> None:
    a = create_backbone("tiny_vit", seed=3)
    b = create_backbone("tiny_vit", seed=3)
    assert isinstance(a.info, ModelInfo) and not a.training
    assert a.info.name == "tiny_vit" and a.info.format == "random" and a.info.source == "registry:tiny_vit"
    assert a.info.weights_sha256 == b.info.weights_sha256 != create_backbone("tiny_vit", seed=4).info.weights_sha256
    assert a.info.num_params == sum(p.numel() for p in a.parameters()) and a.info.input_size == 64
    assert a.info.transform.size == 64 and a.info.origin == {"random_init": {"seed": 3}}


def test_overrides_make_a_differently_named_model() -> None:
    m = create_backbone("tiny_vit", depth=1)
    assert m.info.name == "tiny_vit[depth=1]" and len(m.blocks) == 1
    assert m.cfg.extra == {"derived_from": "tiny_vit", "overrides": {"depth": 1}}
    named = create_backbone("tiny_vit", depth=1, name="one_block")
    assert named.info.name == "one_block" and named.cfg.name == "one_block"
    # An override equal to the entry's own value (or training-only) changes nothing: the name stays.
    assert create_backbone("tiny_vit", depth=2, drop_path_rate=0.1).info.name == "tiny_vit"


def test_named_architecture_with_checkpoint(tmp_path: Path) -> None:
    model = tiny("tiny_vit_mlp", layerscale_init=1e-5)
    torch.save(official_teacher(model.state_dict(), 4, 2, {}), tmp_path / "teacher_checkpoint.pth")
    loaded = create_backbone("tiny_vit_mlp", checkpoint=tmp_path / "teacher_checkpoint.pth", layerscale_init=1e-5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert loaded.info.format == "chexfound_official" and loaded.info.source.endswith("teacher_checkpoint.pth")


def test_file_info_round_trips_through_our_format(tmp_path: Path) -> None:
    m = create_backbone("tiny_vit", seed=0, depth=1, name="mini")
    m.info.origin["ssl"] = {"preset": "mini_recipe", "iterations": 12, "n_images": 34}
    heads = {"dino_head": {"w": torch.ones(2, 2)}}
    save_backbone(m, tmp_path / "b.safetensors", heads=heads)
    meta = read_meta(tmp_path / "b.safetensors")
    assert meta["config"]["name"] == "mini" and meta["ssl"]["preset"] == "mini_recipe"
    back = create_backbone(tmp_path / "b.safetensors")
    assert back.info.name == "mini" and back.info.weights_sha256 == m.info.weights_sha256
    assert back.info.format == "chexfound" and back.info.source == str(tmp_path / "b.safetensors")
    assert back.info.provenance() == "pretrained with preset mini_recipe, 12 iterations, 34 images"
    assert torch.equal(back.info.heads["dino_head"]["w"], heads["dino_head"]["w"])
    assert back.info.summary().startswith("mini: ") and "64 px" in back.info.summary()
    # Saved again (e.g. by the demo), the provenance stays.
    save_backbone(back, tmp_path / "again.safetensors")
    assert read_meta(tmp_path / "again.safetensors")["ssl"]["iterations"] == 12


def test_load_backbone_is_deprecated_but_works(tmp_path: Path) -> None:
    save_backbone(create_backbone("tiny_vit", seed=0), tmp_path / "b.safetensors")
    with pytest.warns(DeprecationWarning, match="create_backbone"):
        model, meta = load_backbone(tmp_path / "b.safetensors")
    for key in ("kind", "format", "source", "config", "config_source", "transform", "weights_sha256", "heads",
                "ignored", "notes", "warnings", "source_dtypes", "converted_from"):
        assert key in meta, key
    assert meta["weights_sha256"] == model.info.weights_sha256 and meta["config"]["name"] == "tiny_vit"


def test_unknown_names_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backbone config 'vit_nope'.*known: .*vits16_224"):
        create_backbone("vit_nope")
    with pytest.raises(CheckpointError, match="file not found"):
        create_backbone(tmp_path / "gone.safetensors")
    with pytest.raises(ConfigError, match="checkpoint= goes with a named architecture"):
        save_backbone(create_backbone("tiny_vit"), tmp_path / "b.safetensors")
        create_backbone(tmp_path / "b.safetensors", checkpoint=tmp_path / "b.safetensors")
    with pytest.raises(ConfigError, match="apply to named configs"):
        create_backbone(tmp_path / "b.safetensors", depth=1)
    # A head count given for a file that records its own must agree with it, not be ignored.
    assert create_backbone(tmp_path / "b.safetensors", num_heads=2).cfg.num_heads == 2
    with pytest.raises(ConfigError, match="4 attention heads given, but its metadata says 2"):
        create_backbone(tmp_path / "b.safetensors", num_heads=4)


@pytest.mark.slow  # fresh Python processes
def test_test_configs_are_not_in_the_production_registry() -> None:
    """A fresh process sees no tiny_vit; with CHEXFOUND_MODEL_MODULES naming the testing module (as the CLI
    processes tests start), it does."""
    assert {"tiny_vit", "tiny_vit_mlp"} <= set(list_configs())  # this process: the test conftest registered them
    code = ("from chexfound.models import list_configs, get_config\n"
            "names = list_configs()\n"
            "assert 'tiny_vit' not in names and 'tiny_vit_mlp' not in names and 'vits16_224' in names, names\n"
            "try:\n    get_config('tiny_vit')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    env = {k: v for k, v in os.environ.items() if k != "CHEXFOUND_MODEL_MODULES"}
    env["PYTHONPATH"] = str(REPO / "src")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ConfigError" in out.stdout and "chexfound.models.testing" in out.stdout
    env["CHEXFOUND_MODEL_MODULES"] = "chexfound.models.testing"
    out = subprocess.run([sys.executable, "-c", "from chexfound.models import get_config; "
                          "print(get_config('tiny_vit').embed_dim)"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "64", out.stderr[-2000:]


def test_released_architecture_supplies_the_head_count_only_when_it_matches(tmp_path: Path) -> None:
    """A DINOv2 hub .pth carries tensors only; ViT-S/14 tensors are the released dinov2_vits14 (6 heads)."""
    with torch.device("meta"):
        ref = create_backbone("dinov2_vits14", depth=1)
    sd = {k: torch.zeros(v.shape) for k, v in ref.state_dict().items()}
    torch.save(sd, tmp_path / "dinov2_vits14_1block.pth")
    with pytest.raises(CheckpointError, match="number of attention heads cannot be read"):
        create_backbone(tmp_path / "dinov2_vits14_1block.pth")  # one block: no released model is that
    assert create_backbone(tmp_path / "dinov2_vits14_1block.pth", head_dim=64).cfg.num_heads == 6
    with pytest.raises(ConfigError, match="does not split"):
        create_backbone(tmp_path / "dinov2_vits14_1block.pth", num_heads=5)
    with torch.device("meta"):
        full = create_backbone("dinov2_vits14")
    torch.save({k: torch.zeros(v.shape) for k, v in full.state_dict().items()}, tmp_path / "dinov2_vits14.pth")
    hub = create_backbone(tmp_path / "dinov2_vits14.pth")
    assert hub.cfg.num_heads == 6 and "released dinov2_vits14" in hub.info.config_source
    assert hub.info.name == "dinov2_vits14" and hub.info.format == "dinov2"


def test_no_warnings_on_the_resolver_path(tmp_path: Path) -> None:
    save_backbone(create_backbone("tiny_vit", seed=0), tmp_path / "b.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_backbone(tmp_path / "b.safetensors")
