"""`--precision` from the command line on real images, the int8 ONNX export, and the precision shown by serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from chexfound.adapt import LinearHead, save_head
from chexfound.cli.main import main
from chexfound.data.findings import NIH14
from chexfound.errors import ConfigError
from chexfound.io import read_image
from chexfound.models import backbone_sha256, create_backbone, save_backbone
from chexfound.models import precision as P
from chexfound.serve import Predictor
from chexfound.serve.app import ServeSettings, create_app
from chexfound.serve.export import onnx_session, read_onnx_metadata


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny backbone whose blocks matter (LayerScale 1) and a linear head that spreads probabilities."""
    root = tmp_path_factory.mktemp("precision")
    torch.manual_seed(0)
    bb = create_backbone("tiny_vit_mlp").eval()
    save_backbone(bb, root / "backbone.safetensors")
    head = LinearHead(NIH14, n_blocks=2, embed_dim=bb.embed_dim, avgpool=True)
    torch.nn.init.normal_(head.linear.weight, std=0.2)
    save_head(head, root / "head.safetensors", backbone_sha256=backbone_sha256(bb), backbone_config=bb.cfg.to_dict())
    return root / "backbone.safetensors", root / "head.safetensors"


def _probs(csv: Path) -> np.ndarray:
    rows = csv.read_text().splitlines()[1:]
    return np.array([[float(v) for v in r.split(",")[1:]] for r in rows])


def test_predict_precision_on_real_images(pair: tuple[Path, Path], png_paths: list[Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bb, hd = pair
    out = {}
    for precision in ("fp32", "bf16", "int8"):
        out[precision] = tmp_path / f"{precision}.csv"
        assert main(["predict", "--backbone", str(bb), "--head", str(hd), "--precision", precision, "--quiet",
                     "--out", str(out[precision]), *map(str, png_paths)]) == 0
    fp32 = _probs(out["fp32"])
    assert fp32.shape == (len(png_paths), len(NIH14)) and fp32.std() > 0.05
    # Stated tolerances on probabilities: bf16 within 0.01, int8 within 0.02 of fp32.
    for precision, tol in (("bf16", 1e-2), ("int8", 2e-2)):
        diff = np.abs(_probs(out[precision]) - fp32).max()
        assert 0 < diff < tol, (precision, diff)
    # the old spelling still works, with a notice
    assert main(["predict", "--backbone", str(bb), "--head", str(hd), "--dtype", "bf16", "--quiet",
                 "--out", str(tmp_path / "old.csv"), str(png_paths[0])]) == 0
    assert "--dtype is deprecated; use --precision" in capsys.readouterr().err


def test_predict_refuses_without_the_instructions(pair: tuple[Path, Path], png_paths: list[Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(P.platform, "machine", lambda: "x86_64")
    bb, hd = pair
    args = ["predict", "--backbone", str(bb), "--head", str(hd), "--precision", "int8", "--quiet",
            "--out", str(tmp_path / "p.csv"), str(png_paths[0])]
    assert main(args) != 0
    assert "lacks the int8 dot-product instructions" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="avx512_vnni, avx_vnni, amx_int8"):
        Predictor(bb, hd, device="cpu", precision="int8")
    assert not (tmp_path / "p.csv").exists()
    assert main([*args, "--allow-slow-precision"]) == 0


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_onnx_export(pair: tuple[Path, Path], png_paths: list[Path], tmp_path: Path, mode: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    bb, hd = pair
    out = tmp_path / "model.onnx"
    extra = ["--quantize-mode", "static", "--calibrate", *map(str, png_paths)] if mode == "static" else []
    assert main(["export", "--format", "onnx", "--backbone", str(bb), "--head", str(hd), "--out", str(out),
                 "--quantize", "int8", *extra]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "int8" and max(report["max_abs_diff"].values()) < 5e-2
    meta = read_onnx_metadata(out)
    assert meta["precision"] == "int8" and mode in meta["quantization"]
    if mode == "static":
        assert meta["calibration"]["images"] == len(png_paths)
        assert meta["calibration"]["files"] == [p.name for p in png_paths]
    else:
        assert meta["calibration"] is None
    sess = onnx_session(out)
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear")
               for n in __import__("onnx").load(str(out)).graph.node)
    p = Predictor(bb, hd, device="cpu")
    x = torch.stack([p.preprocess(read_image(q)) for q in png_paths])
    got = sess.run(None, {"image": x.numpy()})[0]
    ref, _ = p.predict_tensor(x)
    diff = np.abs(got - ref).max()
    assert 0 < diff < 5e-2, diff


def test_serve_shows_precision(pair: tuple[Path, Path]) -> None:
    p = Predictor(*pair, device="cpu", precision="int8")
    with TestClient(create_app(p, ServeSettings())) as client:
        info = client.get("/v1/model").json()
        assert info["precision"] == "int8"
        assert "m.precision" in client.get("/static/app.js").text
    with pytest.warns(DeprecationWarning, match="precision="):
        assert Predictor(*pair, device="cpu", dtype="bf16").precision == "bf16"
