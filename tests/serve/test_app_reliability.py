"""/v1/predict and /v1/model carry the calibrator, the no-call rule and the reader's warnings."""

from __future__ import annotations

from pathlib import Path

import torch
from fastapi.testclient import TestClient

from chexfound.adapt import load_head, save_head
from chexfound.adapt.heads.calibration import Calibrator
from chexfound.models.format import read_meta
from chexfound.serve import Predictor
from chexfound.serve.app import ServeSettings, create_app
from chexfound.stats.recalibration import CalibrationChoice


def test_calls_follow_the_verdicts_and_the_upload_warning_is_returned(models: dict[str, Path], data_root: Path,
                                                                       tmp_path: Path) -> None:
    head = load_head(models["linear"])
    n = len(head.findings)
    head.thresholds.fill_(0.0)  # every finding would be called positive
    head.thresholds[1] = float("nan")  # ... but this one has no threshold (no validation positives)
    head.set_calibration(Calibrator.from_choices([CalibrationChoice(f, "temperature", "", scale=0.5)
                                                  for f in head.findings]), {"methods": ["temperature"] * n})
    head.informative = {"informative": True, "reason": f"{n - 1} of {n} findings informative", "rule": "test",
                        "findings": [{"finding": f, "informative": i != 0, "reasons": [] if i else ["near-random"]}
                                     for i, f in enumerate(head.findings)]}
    meta = read_meta(models["linear"])
    save_head(head, tmp_path / "h.safetensors", backbone_sha256=meta["backbone_sha256"])
    pred = Predictor(models["backbone"], tmp_path / "h.safetensors", device="cpu")
    with TestClient(create_app(pred, ServeSettings(max_wait_ms=1))) as c:
        info = c.get("/v1/model").json()
        assert info["calibration"] == ["temperature"] * n and info["thresholds"][1] is None
        assert info["informative"]["uninformative_findings"] == [head.findings[0]]
        path = data_root / "dicom" / "Fake_MONOHR1.dcm"
        with open(path, "rb") as f:
            r = c.post("/v1/predict", files={"file": (path.name, f, "application/dicom")})
    assert r.status_code == 200, r.text
    body = r.json()
    f0, f1, f2 = body["findings"][:3]
    assert "positive" not in f0 and f0["informative"] is False and f0["uninformative_reason"] == "near-random"
    assert "positive" not in f1 and "threshold" not in f1  # no threshold: no call (and null, not NaN)
    assert f2["positive"] is True and f2["calibration"] == "temperature"
    assert body["positive"] == head.findings[2:] and "uninformative" not in body
    assert any("MONOCHROME1" in w for w in body["image"]["warnings"])
