"""`chexfound convert`: official checkpoint -> our safetensors, heads kept, SHA-256 printed and stored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckpt_layouts import official_teacher, ssl_heads, tiny
from chexfound.cli.main import main
from chexfound.models import create_backbone
from chexfound.models.format import read_meta, sha256_file


def test_convert_official_keeps_heads_and_records_sha(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny("tiny_vit")
    heads = ssl_heads(64)
    src = tmp_path / "teacher_checkpoint.pth"
    torch.save(official_teacher(model.state_dict(), 2, 2, heads), src)
    out = tmp_path / "chexfound_tiny.safetensors"
    assert main(["convert", str(src), "--out", str(out), "--config", "tiny_vit"]) == 0
    printed = capsys.readouterr().out
    sha = sha256_file(out)
    meta = read_meta(out)
    # both hashes, named: the weights hash (what every other command shows) and the file's bytes
    assert f"weights_sha256  {meta['weights_sha256']}" in printed and f"file_sha256     {sha}" in printed
    assert "head    dino_head" in printed
    assert (tmp_path / "chexfound_tiny.safetensors.sha256").read_text().split()[0] == sha
    assert meta["source"]["format"] == "chexfound_official" and meta["source"]["sha256"] == sha256_file(src)
    assert meta["head_names"] == ["dino_head", "ibot_head"]
    loaded = create_backbone(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert torch.equal(loaded.info.heads["ibot_head"]["last_layer.weight_v"], heads["ibot_head.last_layer.weight_v"])
    assert loaded.info.weights_sha256 == meta["weights_sha256"]

    bare = tmp_path / "bare.safetensors"
    assert main(["convert", str(out), "--out", str(bare), "--no-heads", "--quiet"]) == 0
    assert read_meta(bare)["head_names"] == []


def test_convert_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "teacher_checkpoint.pth"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    assert main(["convert", str(bad), "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and ("truncated" in err or "corrupt" in err)
    assert not (tmp_path / "o.safetensors").exists()
