"""The demo's linear head files are its logistic probes: a `LinearHead` built from a fitted probe gives the
probe's probabilities on the same images, and keeps its thresholds and their rules."""

from __future__ import annotations

import numpy as np
import torch

from chexfound.demo.pipeline import call_rates, linear_head_from_probe
from chexfound.models.pooled import linear_input
from chexfound.stats import fit_probe


def test_linear_head_from_probe_reproduces_the_probe():
    rng = np.random.default_rng(0)
    n, n_blocks, d, tokens = 120, 2, 8, 5
    blocks = [(torch.randn(n, tokens, d), torch.randn(n, d)) for _ in range(3)]  # (patch tokens, CLS) per block
    cls = torch.stack([c for _, c in blocks[-n_blocks:]], dim=1).numpy()
    x = linear_input(cls, blocks[-1][0].mean(dim=1).numpy(), n_blocks, avgpool=True)  # the demo's probe input
    y = (x[:, :2] + 0.5 * rng.normal(size=(n, 2)) > 0).astype(np.float64)
    y[rng.random((n, 2)) < 0.1] = np.nan
    probe = fit_probe(x, y, np.arange(80), np.arange(80, n), findings=["A", "B"])
    head = linear_head_from_probe(probe, ["A", "B"], n_blocks, d)
    with torch.no_grad():
        logits, _ = head(blocks)
    np.testing.assert_allclose(head.probabilities(logits).numpy(), probe.predict_proba(x), atol=1e-5)
    np.testing.assert_allclose(head.thresholds.numpy(), probe.thresholds, rtol=1e-6)
    assert [r["rule"] for r in head.threshold_rules] == [c.rule for c in probe.threshold_choices]


def test_call_rates_count_labelled_images_only():
    y = np.array([[1, 0], [np.nan, np.nan], [0, 0], [1, 1]])
    p = np.array([[0.9, 0.1], [0.9, 0.9], [0.2, 0.6], [0.8, 0.7]])
    c = call_rates(y, p, np.array([0.5, 0.5]))
    assert c == {"calls_per_image": 4 / 3, "labels_per_image": 1.0, "n_findings": 2}  # rows 0, 2, 3


def test_the_pixel_label_efficiency_curve_leaves_unreadable_images_out(data_root, tmp_path):
    """The pixel baseline stores which images it could read, so the label-efficiency curve fits and scores the
    pixels on the same readable images as the backbones (it used to take every row, zeros included)."""
    import pandas as pd

    from chexfound.demo.pipeline import DemoConfig, TaskSpec, pixel_baseline, pixel_source

    lab = pd.read_csv(data_root / "kermany" / "labels.csv")
    rows = pd.concat([lab[lab["label"] == c].head(15) for c in ("NORMAL", "PNEUMONIA")]).reset_index(drop=True)
    df = pd.DataFrame({"path": [str(data_root / "kermany" / p) for p in rows["path"]],
                       "patient_id": rows["patient_key"], "PNEUMONIA": (rows["label"] == "PNEUMONIA").astype(int),
                       "split": np.tile(["train", "train", "val", "test", "train"], 6)})
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    df.loc[0, "path"] = str(broken)
    df.to_csv(tmp_path / "k.csv", index=False)
    cfg = DemoConfig(data=data_root, out=tmp_path / "out", n_boot=20)
    (cfg.out / "cache").mkdir(parents=True)
    task = TaskSpec("kermany", tmp_path / "k.csv", ["PNEUMONIA"], ("linear",))
    pixel_baseline(cfg, task, lambda s: None)
    x, ok = pixel_source(cfg, task)
    assert x.shape == (30, 1024) and ok.tolist() == [False] + [True] * 29
    (cfg.out / "cache" / "pixels-kermany-ok.npy").unlink()  # a run folder from before the mask was stored
    assert pixel_source(cfg, task)[1].tolist() == ok.tolist()
