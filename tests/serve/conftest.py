"""Tiny models for the serve tests: a `tiny_vit` backbone (64 px) with a linear head and a small GLoRI head,
saved in our file format in a session tmp dir; plus a handful of real images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from chexfound.adapt import GloriHead, LinearHead, save_head
from chexfound.data.findings import NIH14
from chexfound.models import backbone_sha256, create_backbone, save_backbone

ARTIFACTS = Path(__file__).parent / "artifacts"  # git-ignored: screenshots etc. to look at after a run


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-models")
    torch.manual_seed(0)
    bb = create_backbone("tiny_vit").eval()
    sha = backbone_sha256(bb)
    save_backbone(bb, root / "backbone.safetensors")

    # With random weights (LayerScale 1e-5) the CLS token barely depends on the image, the mean patch token
    # does: avgpool makes different images give visibly different outputs; std spreads them over (0, 1).
    linear = LinearHead(NIH14, n_blocks=2, embed_dim=bb.embed_dim, avgpool=True)
    nn.init.normal_(linear.linear.weight, std=0.2)
    linear.thresholds.copy_(torch.linspace(0.2, 0.8, len(NIH14)))
    save_head(linear, root / "linear.safetensors", backbone_sha256=sha, backbone_config=bb.cfg.to_dict())

    attn = GloriHead(NIH14, n_blocks=2, embed_dim=bb.embed_dim, decoder_dim=32, num_heads=2, ffn_dim=64).eval()
    save_head(attn, root / "attention.safetensors", backbone_sha256=sha, backbone_config=bb.cfg.to_dict())

    coarse = GloriHead(NIH14, n_blocks=2, embed_dim=bb.embed_dim, decoder_dim=32, num_heads=2, ffn_dim=64,
                       coarse_pools=(2,), grid=(4, 4)).eval()
    save_head(coarse, root / "coarse.safetensors", backbone_sha256=sha, backbone_config=bb.cfg.to_dict())

    torch.manual_seed(1)
    other = create_backbone("tiny_vit").eval()
    save_backbone(other, root / "other_backbone.safetensors")
    return {"root": root, "backbone": root / "backbone.safetensors", "linear": root / "linear.safetensors",
            "attention": root / "attention.safetensors", "coarse": root / "coarse.safetensors", "other_backbone": root / "other_backbone.safetensors"}


@pytest.fixture(scope="session")
def png_paths(data_root: Path) -> list[Path]:
    paths = sorted((data_root / "nih14-fullres" / "images").glob("*.png"))[:3]
    assert len(paths) == 3, f"expected NIH full-res PNGs under {data_root}"
    return paths


@pytest.fixture(scope="session")
def small_png(data_root: Path) -> Path:
    """A 512-px NIH PNG (cheap to decode: the load test sends it many times)."""
    paths = sorted((data_root / "nih14" / "images").glob("*.png"))
    assert paths, f"expected NIH 512-px PNGs under {data_root / 'nih14'}"
    return paths[0]


@pytest.fixture(scope="session")
def dicom_paths(data_root: Path) -> list[Path]:
    d = data_root / "dicom"
    paths = [d / "RG1_UNCR.dcm", d / "CR-MONO1-10-chest.dcm", d / "RG1_J2KR.dcm"]
    for p in paths:
        assert p.is_file(), f"missing {p}"
    return paths


@pytest.fixture
def not_an_image(tmp_path: Path) -> Path:
    p = tmp_path / "notes.png"
    p.write_text("this is not a radiograph\n")
    return p
