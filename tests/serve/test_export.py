"""ONNX export checked against PyTorch with onnxruntime (dynamic batch), and the safetensors bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chexfound.cli.main import main
from chexfound.data.findings import NIH14
from chexfound.io import read_image
from chexfound.serve import Predictor
from chexfound.serve.export import onnx_session, read_onnx_metadata


@pytest.mark.parametrize("head", ["attention", "coarse", "linear"])
def test_onnx_matches_pytorch(models: dict[str, Path], png_paths: list[Path], tmp_path: Path, head: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.onnx"
    rc = main(["export", "--format", "onnx", "--backbone", str(models["backbone"]), "--head", str(models[head]),
               "--out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["opset"] == 17 and max(report["max_abs_diff"].values()) < 1e-4

    p = Predictor(models["backbone"], models[head], device="cpu")
    meta = read_onnx_metadata(out)
    assert meta["findings"] == list(NIH14) and meta["transform"] == p.transform.to_dict()
    assert meta["thresholds"] == pytest.approx(p.thresholds.tolist())
    assert meta["backbone_sha256"] == p.backbone_sha256
    # the rule behind each threshold travels with it
    assert meta["threshold_rules"] == p.threshold_rules and len(meta["threshold_rules"]) == len(meta["findings"])
    assert all(r["rule"] and r["reason"] for r in meta["threshold_rules"])

    sess = onnx_session(out)
    names = [o.name for o in sess.get_outputs()]
    assert names == (["probabilities", "attention"] if head != "linear" else ["probabilities"])
    # Real images, batch sizes other than the traced one (dynamic batch axis).
    x = torch.stack([p.preprocess(read_image(q)) for q in png_paths])
    for batch in (x[:1], x):
        got = sess.run(None, {"image": batch.numpy()})
        probs, maps = p.predict_tensor(batch)
        np.testing.assert_allclose(got[0], probs, atol=1e-5)
        if head != "linear":
            np.testing.assert_allclose(got[1], maps, atol=1e-5)


def test_safetensors_export_cli(models: dict[str, Path], png_paths: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "bundle.safetensors"
    assert main(["export", "--format", "safetensors", "--backbone", str(models["backbone"]),
                 "--head", str(models["attention"]), "--out", str(out)]) == 0
    csv_out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(out), "--out", str(csv_out), "--quiet", str(png_paths[0])]) == 0
    ref = Predictor(models["backbone"], models["attention"], device="cpu").predict_image(png_paths[0])
    row = csv_out.read_text().splitlines()[1].split(",")
    np.testing.assert_allclose([float(v) for v in row[1:]], ref.probabilities, atol=1e-5)


def test_failed_verification_leaves_no_file(models: dict[str, Path], tmp_path: Path) -> None:
    from chexfound.errors import CheckpointError
    from chexfound.serve.export import export_onnx

    p = Predictor(models["backbone"], models["linear"], device="cpu")
    out = tmp_path / "model.onnx"
    with pytest.raises(CheckpointError, match="model.onnx: ONNX outputs differ"):
        export_onnx(p, out, atol=-1.0)  # no tolerance can be met
    assert list(tmp_path.iterdir()) == []
