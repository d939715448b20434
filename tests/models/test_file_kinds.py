"""A file's bytes, not its name, say how it is read: a torch checkpoint named *.safetensors (or a safetensors file
named .pth) loads as what it is, and a file of the wrong kind gets the project's error naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ckpt_layouts import official_teacher, tiny
from chexfound.adapt import LinearHead, load_head, save_head
from chexfound.cli.main import main
from chexfound.errors import CheckpointError
from chexfound.models import create_backbone, save_backbone
from chexfound.models.filekind import sniff
from chexfound.models.format import load_tensors, read_meta


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = tiny("tiny_vit")
    torch.save(official_teacher(model.state_dict(), 2, 0, {}), tmp_path / "torch_named.safetensors")
    save_backbone(model, tmp_path / "ours.safetensors")
    shutil.copy(tmp_path / "ours.safetensors", tmp_path / "ours_named.pth")
    head = LinearHead(["A", "B"], 1, "multilabel", 64, False)
    save_head(head, tmp_path / "head.safetensors", backbone_sha256="0")
    shutil.copy(tmp_path / "head.safetensors", tmp_path / "head_named.pth")
    (tmp_path / "random.safetensors").write_bytes(bytes(range(256)) * 4)
    # (the model cards beside the saved files share their stems)
    return {"model": model, "root": tmp_path,  # type: ignore[dict-item]
            **{p.stem: p for p in tmp_path.iterdir() if p.suffix != ".md"}}


def same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_sniff_reads_the_bytes(files: dict[str, Path]) -> None:
    assert sniff(files["torch_named"]) == "torch-zip"
    assert sniff(files["ours_named"]) == "safetensors"


def test_resolver_reads_what_the_file_is(files: dict[str, Path]) -> None:
    a = create_backbone(files["torch_named"], config="tiny_vit")
    same(a, files["model"])  # type: ignore[arg-type]
    assert a.info.format == "chexfound_official"
    assert any("named like a safetensors file but is a PyTorch checkpoint" in n for n in a.info.notes)
    b = create_backbone(files["ours_named"])
    same(b, files["model"])  # type: ignore[arg-type]
    assert b.info.format == "chexfound"
    with pytest.raises(CheckpointError, match="random.safetensors: this is an unrecognised binary file"):
        create_backbone(files["random"])


def test_our_readers_name_the_real_kind(files: dict[str, Path]) -> None:
    for read in (read_meta, load_tensors):
        with pytest.raises(CheckpointError) as e:
            read(files["torch_named"])
        assert str(files["torch_named"]) in str(e.value)
        assert "this is a PyTorch checkpoint (torch.save zip archive), not a chexfound safetensors file" in str(e.value)


def test_load_head_reads_what_the_file_is(files: dict[str, Path]) -> None:
    h = load_head(files["head_named"])
    assert h.findings == ["A", "B"] and h.info.format == "chexfound" and h.info.backbone_sha256 == "0"
    assert any("named like a PyTorch checkpoint" in n for n in h.info.meta["notes"])
    # A torch checkpoint named .safetensors is read as the released head layouts are; this one is a backbone.
    with pytest.raises(CheckpointError, match="torch_named.safetensors.*not a CheXFound head"):
        load_head(files["torch_named"])
    with pytest.raises(CheckpointError, match="random.safetensors: this is an unrecognised binary file, not a head"):
        load_head(files["random"])
    with pytest.raises(CheckpointError, match="ours.safetensors: expected a head file, found kind='backbone'"):
        load_head(files["ours"])


def test_convert_reads_what_the_file_is(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = files["root"] / "converted.safetensors"
    assert main(["convert", str(files["torch_named"]), "--arch", "tiny_vit", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "named like a safetensors file but is a PyTorch checkpoint" in printed
    same(create_backbone(out), files["model"])  # type: ignore[arg-type]
    assert main(["convert", str(files["random"]), "--out", str(files["root"] / "x.safetensors")]) == 2
    assert "random.safetensors: this is an unrecognised binary file" in capsys.readouterr().err


def test_random_bytes_are_not_called_text(tmp_path: Path) -> None:
    """100 random bytes were once "a text file" (they hold no NUL byte by chance); text must decode as UTF-8
    and be mostly printable."""
    import numpy as np

    rnd = tmp_path / "random.pth"
    rnd.write_bytes(np.random.default_rng(0).integers(1, 256, 100, dtype=np.uint8).tobytes())
    assert sniff(rnd) == "an unrecognised binary file"
    yml = tmp_path / "config.pth"
    yml.write_text("student:\n  arch: vits16_224  # ViT-S/16 – 224 px\n")
    assert sniff(yml) == "a text file (YAML/CSV/...?)"
