"""Predictor: real PNG and DICOM files in, per-finding probabilities, calls and attention maps out."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import chexfound
from chexfound.adapt import load_head
from chexfound.data.findings import NIH14
from chexfound.errors import CheckpointError
from chexfound.io import read_image
from chexfound.models import create_backbone
from chexfound.serve import Predictor
from chexfound.serve.export import export_safetensors


def test_top_level_alias() -> None:
    assert chexfound.Predictor is Predictor


def test_predict_real_png_and_dicom(models: dict[str, Path], png_paths: list[Path], dicom_paths: list[Path]) -> None:
    p = Predictor(models["backbone"], models["linear"], device="cpu")
    assert p.findings == list(NIH14)
    paths = png_paths + dicom_paths
    preds = p.predict(paths, batch_size=2)
    assert [x.path for x in preds] == [str(q) for q in paths]
    for x in preds:
        assert x.ok, x.error
        assert x.probabilities.shape == (len(NIH14),)
        assert np.all((x.probabilities >= 0) & (x.probabilities <= 1))
        # A linear avgpool head has a map too: its per-patch logit shares (chexfound.adapt.attribution).
        assert x.attention is not None and x.attention.shape == (len(NIH14), p.grid_size, p.grid_size)
        assert x.positive_findings() == [n for n, pr, t in zip(NIH14, x.probabilities, p.thresholds) if pr >= t]
    # Different images give different outputs (the model really looks at the pixels).
    assert not np.allclose(preds[0].probabilities, preds[1].probabilities, atol=1e-4)
    # The same CR image stored uncompressed and as lossless JPEG 2000 decodes to the same pixels.
    uncr, j2kr = preds[len(png_paths)], preds[len(png_paths) + 2]
    np.testing.assert_allclose(uncr.probabilities, j2kr.probabilities, atol=1e-5)


def test_batched_equals_single_and_manual_pipeline(models: dict[str, Path], png_paths: list[Path]) -> None:
    p = Predictor(models["backbone"], models["linear"], device="cpu")
    batched = p.predict(png_paths, batch_size=3)
    for path, b in zip(png_paths, batched):
        single = p.predict_image(path)
        np.testing.assert_allclose(single.probabilities, b.probabilities, atol=1e-5)
    # Against the contracts done by hand: create_backbone + its transform + get_intermediate_layers + head.
    bb = create_backbone(models["backbone"])
    head = load_head(models["linear"])
    x = bb.info.transform(read_image(png_paths[0]).pixels)[None]
    with torch.no_grad():
        logits, _ = head(bb.get_intermediate_layers(x, n=head.n_blocks, return_class_token=True))
    np.testing.assert_allclose(head.probabilities(logits)[0].numpy(), batched[0].probabilities, atol=1e-5)


def test_bad_files_are_reported_not_fatal(models: dict[str, Path], png_paths: list[Path], not_an_image: Path,
                                          tmp_path: Path) -> None:
    p = Predictor(models["backbone"], models["linear"], device="cpu")
    missing = tmp_path / "missing.dcm"
    preds = p.predict([png_paths[0], not_an_image, missing, png_paths[1]], batch_size=2)
    assert [x.ok for x in preds] == [True, False, False, True]
    assert str(not_an_image) in preds[1].error and preds[1].probabilities is None
    assert "missing.dcm" in preds[2].error
    assert preds[1].to_dict() == {"path": str(not_an_image), "error": preds[1].error}


def test_attention_head_gives_maps(models: dict[str, Path], png_paths: list[Path]) -> None:
    p = Predictor(models["backbone"], models["attention"], device="cpu")
    assert p.has_attention
    g = p.grid_size
    pred = p.predict([png_paths[0]])[0]
    assert pred.attention.shape == (len(NIH14), g, g)
    # Softmax attention over patches, averaged over heads: each finding's map sums to 1.
    np.testing.assert_allclose(pred.attention.reshape(len(NIH14), -1).sum(-1), 1.0, atol=1e-4)
    linear = Predictor(models["backbone"], models["linear"], device="cpu")
    assert not linear.has_attention and linear.has_heatmaps
    assert p.heatmap_kind == "glori_attention" and linear.heatmap_kind == "linear_patch_contribution"


def test_head_from_another_backbone_warns_or_fails(models: dict[str, Path]) -> None:
    # Refused unless explicitly allowed; allowed, it warns and says so in the model info; strict refuses anyway.
    with pytest.raises(CheckpointError, match="linear.safetensors.*trained on backbone.*allow_backbone_mismatch"):
        Predictor(models["other_backbone"], models["linear"], device="cpu")
    with pytest.warns(UserWarning, match="trained on backbone"):
        p = Predictor(models["other_backbone"], models["linear"], device="cpu", allow_backbone_mismatch=True)
    assert p.pairing_warning and p.info()["head"]["pairing_warning"] == p.pairing_warning
    with pytest.raises(CheckpointError, match="linear.safetensors.*trained on backbone"):
        Predictor(models["other_backbone"], models["linear"], device="cpu", strict=True, allow_backbone_mismatch=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Predictor(models["backbone"], models["linear"], device="cpu").pairing_warning is None


def test_model_info(models: dict[str, Path]) -> None:
    p = Predictor(models["backbone"], models["attention"], device="cpu")
    info = p.info()
    bb = create_backbone(models["backbone"])
    assert info["backbone"]["weights_sha256"] == bb.info.weights_sha256
    assert info["head"]["head_type"] == "glori" and info["head"]["has_attention"]
    assert info["findings"] == list(NIH14) and len(info["thresholds"]) == len(NIH14)
    assert info["transform"]["size"] == 64


@pytest.mark.parametrize("dtype, atol", [("fp32", 0.0), ("fp16", 5e-3)])
def test_safetensors_bundle_roundtrip(models: dict[str, Path], png_paths: list[Path], tmp_path: Path,
                                      dtype: str, atol: float) -> None:
    p = Predictor(models["backbone"], models["attention"], device="cpu")
    out = tmp_path / f"bundle-{dtype}.safetensors"
    export_safetensors(p, out, dtype=dtype)
    q = Predictor.from_bundle(out, device="cpu")
    assert q.findings == p.findings and q.transform == p.transform
    assert q.backbone_sha256 == p.backbone_sha256 and q.pairing_warning is None
    np.testing.assert_array_equal(q.thresholds, p.thresholds)
    a, b = p.predict(png_paths[:2]), q.predict(png_paths[:2])
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.probabilities, y.probabilities, atol=atol, rtol=0)
        np.testing.assert_allclose(x.attention, y.attention, atol=max(atol, 1e-6), rtol=0)


def test_predictions_say_which_rule_chose_each_threshold(models, png_paths, tmp_path):
    """A threshold's meaning (the rule and its evidence) travels from the head file to every output."""
    from chexfound.adapt.heads.base import save_head
    from chexfound.models.format import read_meta
    from chexfound.stats.thresholds import choose_thresholds

    head = load_head(models["linear"])
    n = len(head.findings)
    rng = np.random.default_rng(0)
    y = (rng.random((60, n)) < 0.2).astype(float)
    head.set_thresholds(choose_thresholds(y, rng.random((60, n)), "f1", prevalence=np.full(n, 0.2),
                                          findings=head.findings))
    meta = read_meta(models["linear"])
    save_head(head, tmp_path / "ruled.safetensors", backbone_sha256=meta["backbone_sha256"],
              backbone_config=meta["backbone_config"])
    pred = Predictor(models["backbone"], tmp_path / "ruled.safetensors")
    out = pred.predict_image(png_paths[0]).findings_list()
    assert [f["threshold_rule"] for f in out] == ["prevalence"] * n  # random scores: near-random evidence
    assert all("validation" in f["threshold_reason"] for f in out)
    assert pred.info()["threshold_rules"][0]["rule"] == "prevalence"
    old = Predictor(models["backbone"], models["linear"])  # a head file from before rules were recorded
    assert {f["threshold_rule"] for f in old.predict_image(png_paths[0]).findings_list()} == {"unrecorded"}


def test_a_head_whose_thresholds_were_never_chosen_says_default_not_unrecorded(models, png_paths, tmp_path):
    """A head trained without validation data (or a multiclass head) keeps 0.5 and records no rules: its
    outputs say "default" (0.5, none chosen) rather than blaming the file for not recording them."""
    from chexfound.adapt.heads.base import save_head
    from chexfound.models.format import read_meta

    head = load_head(models["linear"])
    head.thresholds.fill_(0.5)
    head.threshold_rules = []
    meta = read_meta(models["linear"])
    save_head(head, tmp_path / "unchosen.safetensors", backbone_sha256=meta["backbone_sha256"],
              backbone_config=meta["backbone_config"])
    pred = Predictor(models["backbone"], tmp_path / "unchosen.safetensors")
    out = pred.predict_image(png_paths[0]).findings_list()
    assert {f["threshold_rule"] for f in out} == {"default"}
    assert all("no threshold was chosen" in f["threshold_reason"] for f in out)
