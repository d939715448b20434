"""A head's post-hoc calibrator: the torch module equals the statistics layer's numbers, survives the head file
(no pickle), keeps AUROC, and is applied by Predictor and inside the ONNX graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chexfound.adapt import LinearHead, load_head, save_head
from chexfound.adapt.calibrate import calibrate_head
from chexfound.adapt.heads.calibration import Calibrator
from chexfound.stats.ranking import binary_auroc
from chexfound.stats.recalibration import CalibrationChoice, apply_binary, fit_isotonic

FINDINGS = ["none", "temperature", "platt", "isotonic"]


def _choices() -> list[CalibrationChoice]:
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 500)
    kx, ky = fit_isotonic((rng.uniform(size=500) < p ** 2).astype(float), p)
    return [CalibrationChoice("none", "none", ""),
            CalibrationChoice("temperature", "temperature", "", temperature=2.0, scale=0.5),
            CalibrationChoice("platt", "platt", "", scale=0.7, bias=-0.4),
            CalibrationChoice("isotonic", "isotonic", "", knots_x=kx, knots_y=ky)]


def test_the_torch_calibrator_equals_the_numpy_one_and_keeps_the_ranking():
    choices = _choices()
    cal = Calibrator.from_choices(choices)
    z = torch.randn(2000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float32) * 3
    got = cal(z).double().numpy()
    raw = torch.sigmoid(z).double().numpy()
    y = (np.random.default_rng(2).uniform(size=raw.shape) < raw).astype(float)
    for c, ch in enumerate(choices):
        np.testing.assert_allclose(got[:, c], apply_binary(ch, raw[:, c]), atol=1e-5)
        assert binary_auroc(y[:, c], got[:, c]) == pytest.approx(binary_auroc(y[:, c], raw[:, c]), abs=1e-9)


def test_a_calibrated_head_round_trips_through_its_file(tmp_path):
    head = LinearHead(FINDINGS, n_blocks=1, embed_dim=8).eval()
    head.set_calibration(Calibrator.from_choices(_choices()), {"methods": [c.method for c in _choices()]})
    feats = [(torch.randn(3, 4, 8), torch.randn(3, 8))]
    with torch.no_grad():
        logits, _ = head(feats)
        want = head.probabilities(logits)
    assert not torch.allclose(want, head.raw_probabilities(logits))
    save_head(head, tmp_path / "h.safetensors")
    back = load_head(tmp_path / "h.safetensors")
    assert back.calibration is not None and back.calibration_info["methods"] == FINDINGS
    with torch.no_grad():
        torch.testing.assert_close(back.probabilities(back(feats)[0]), want)
    # A head without a calibrator still loads and has none.
    save_head(LinearHead(FINDINGS, n_blocks=1, embed_dim=8), tmp_path / "plain.safetensors")
    assert load_head(tmp_path / "plain.safetensors").calibration is None


def test_calibrate_head_sets_thresholds_on_calibrated_scores_and_judges_the_head():
    rng = np.random.default_rng(3)
    n = 600
    y = (rng.uniform(size=(n, 2)) < 0.3).astype(np.float32)
    z = np.where(y == 1, 1.0, -1.0) * 1.5 + rng.normal(0, 1, (n, 2))
    p = 1 / (1 + np.exp(-3 * z))  # overconfident: a temperature of ~3 fixes it
    y[:, 1] = 0  # no validation positives for the second finding
    head = LinearHead(["a", "b"], n_blocks=1, embed_dim=4)
    out = calibrate_head(head, y, p.astype(np.float32), "f1", [0.3, 0.01])
    info = head.calibration_info
    assert info["methods"][0] in ("temperature", "platt", "isotonic") and info["methods"][1] == "none"
    assert head.threshold_rules[0]["rule"] == "f1" and out[:, 0].min() >= 0
    # The threshold was chosen on calibrated scores: it is one of them.
    assert np.isclose(out[:, 0], float(head.thresholds[0]), atol=1e-6).any()
    # No validation positives: no threshold and no call, never a degenerate one.
    assert head.threshold_rules[1]["rule"] == "none" and torch.isnan(head.thresholds[1])
    verdict = head.informative
    assert verdict["informative"] and [f["informative"] for f in verdict["findings"]] == [True, False]


def test_predictor_and_onnx_apply_the_calibrator(tmp_path):
    from chexfound.models import backbone_sha256, create_backbone
    from chexfound.serve import Predictor
    from chexfound.serve.export import export_onnx, read_onnx_metadata

    torch.manual_seed(0)
    bb = create_backbone("tiny_vit").eval()
    head = LinearHead(FINDINGS, n_blocks=2, embed_dim=bb.embed_dim, avgpool=True).eval()
    torch.nn.init.normal_(head.linear.weight, std=0.5)
    head.set_calibration(Calibrator.from_choices(_choices()), {"methods": FINDINGS})
    save_head(head, tmp_path / "h.safetensors", backbone_sha256=backbone_sha256(bb))
    pred = Predictor(bb, tmp_path / "h.safetensors", device="cpu")
    x = torch.randn(3, 3, 64, 64)
    got, _ = pred.predict_tensor(x)
    cal = pred.head.calibration
    pred.head.calibration = None
    raw, _ = pred.predict_tensor(x)
    pred.head.calibration = cal
    for c, ch in enumerate(_choices()):
        np.testing.assert_allclose(got[:, c], apply_binary(ch, raw[:, c].astype(np.float64)), atol=1e-5)
    assert pred.info()["calibration"] == FINDINGS
    from chexfound.serve.export import export_safetensors

    export_safetensors(pred, tmp_path / "bundle.safetensors")  # the one-file bundle keeps the calibrator too
    np.testing.assert_array_equal(Predictor.from_bundle(tmp_path / "bundle.safetensors", device="cpu")
                                  .predict_tensor(x)[0], got)
    res = export_onnx(pred, tmp_path / "m.onnx")  # verified against Predictor's (calibrated) outputs
    assert res["max_abs_diff"]["probabilities"] < 1e-4
    meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert meta["calibration_applied_in_graph"] is True
    assert [c["method"] for c in meta["calibration"]] == FINDINGS and meta["calibration"][3]["knots_x"][0] == 0.0
