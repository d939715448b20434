"""A model derived from a registry config with overrides carries its own name (the pretraining
preset's), and `embed`, `/v1/model`, the page and exports show that name, its size, input resolution and
where it came from - not the name of the registry entry it was derived from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from chexfound.adapt import LinearHead, save_head
from chexfound.cli.main import main
from chexfound.data.findings import NIH14
from chexfound.models import create_backbone, save_backbone
from chexfound.models.pooled_file import read_features
from chexfound.serve import Predictor
from chexfound.serve.app import ServeSettings, create_app
from chexfound.serve.export import export_safetensors


@pytest.fixture(scope="module")
def derived(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A backbone as the demo's pretraining leaves it: vits16_224 with overrides, named after its preset."""
    root = tmp_path_factory.mktemp("derived")
    bb = create_backbone("vits16_224", seed=0, embed_dim=64, num_heads=2, depth=2, num_register_tokens=2,
                         img_size=64, name="demo_tiny")
    bb.info.origin["ssl"] = {"preset": "demo_tiny", "iterations": 7, "n_images": 11}
    save_backbone(bb, root / "backbone.safetensors")
    head = LinearHead(NIH14, n_blocks=2, embed_dim=64, avgpool=True)
    save_head(head, root / "head.safetensors", backbone_sha256=bb.info.weights_sha256)
    return {"backbone": root / "backbone.safetensors", "head": root / "head.safetensors",
            "n_params": sum(p.numel() for p in bb.parameters())}  # type: ignore[dict-item]


def test_v1_model_and_page_header_show_name_size_resolution_origin(derived: dict[str, Path]) -> None:
    p = Predictor(derived["backbone"], derived["head"], device="cpu")
    with TestClient(create_app(p, ServeSettings(max_wait_ms=1))) as client:
        b = client.get("/v1/model").json()["backbone"]
        js = client.get("/static/app.js").text
    assert b["name"] == "demo_tiny" and b["name"] != "vits16_224"
    assert b["num_params"] == derived["n_params"] and b["input_size"] == 64
    assert b["provenance"] == "pretrained with preset demo_tiny, 7 iterations, 11 images"
    # The page's header line is built from exactly these fields.
    assert all(f"b.{k}" in js for k in ("name", "num_params", "input_size", "provenance"))


def test_embed_prints_and_records_the_name(derived: dict[str, Path], data_root: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    img = sorted((data_root / "nih14" / "images").glob("*.png"))[0]
    out = tmp_path / "f.npz"
    assert main(["embed", str(img), "--backbone", str(derived["backbone"]), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "demo_tiny: " in err and "k params, 64 px, pretrained with preset demo_tiny" in err
    meta = read_features(out)["meta"]
    assert meta["backbone_name"] == "demo_tiny" and meta["backbone_info"]["num_params"] == derived["n_params"]


def test_bundle_keeps_the_name(derived: dict[str, Path], tmp_path: Path) -> None:
    p = Predictor(derived["backbone"], derived["head"], device="cpu")
    export_safetensors(p, tmp_path / "bundle.safetensors")
    q = Predictor.from_bundle(tmp_path / "bundle.safetensors", device="cpu")
    assert q.info()["backbone"]["name"] == "demo_tiny"
    assert q.info()["backbone"]["provenance"] == p.info()["backbone"]["provenance"]


def test_old_config_spellings_still_work_with_a_notice(data_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`--config` means a pretraining recipe only; embed/adapt's `--config NAME` is now `--backbone NAME`."""
    img = str(sorted((data_root / "nih14" / "images").glob("*.png"))[0])
    new, old = tmp_path / "new.npz", tmp_path / "old.npz"
    assert main(["embed", img, "--backbone", "tiny_vit", "--out", str(new), "--quiet"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main(["embed", img, "--config", "tiny_vit", "--out", str(old), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "--config is deprecated here" in err and "use --backbone NAME" in err
    a, b = read_features(new), read_features(old)
    torch.testing.assert_close(torch.from_numpy(a["cls"]), torch.from_numpy(b["cls"]), atol=0, rtol=0)
