"""`chexfound evaluate --task ...` end to end on small real subsets with tiny random backbones."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from chexfound.cli.main import main
from chexfound.data.transform import InputTransform
from chexfound.evaluate.protocols.localisation import collect_items
from chexfound.models import create_backbone, save_backbone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("bb") / "tiny.safetensors"
    save_backbone(create_backbone("tiny_vit"), p)
    return p


def test_nih14_compare_and_localisation(tiny, data_root, tmp_path):
    out = tmp_path / "nih"
    args = ["evaluate", "--task", "nih14", "--root", str(data_root / "nih14"), "--backbone", str(tiny),
            "--backbone", "tiny_vit_mlp", "--head", "logistic", "--protocol", "localisation", "--limit", "25",
            "--bootstrap", "100",
            "--out", str(out), "--quiet", "--batch-size", "16"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["reference"] == "tiny/logistic" and set(m["models"]) == {"tiny/logistic", "tiny_vit_mlp/logistic"}
    assert "tiny_vit_mlp/logistic - tiny/logistic" in m["paired"]
    assert {"auroc", "ap", "auroc_ci"} <= set(m["macro"])
    pf = m["per_finding"]["Cardiomegaly"]
    assert {"auroc", "ap", "auroc_ci", "n_pos"} <= set(pf)
    assert m["provenance"]["backbone_sha256"] and m["provenance"]["manifest_sha256"]
    assert m["provenance"]["task"]["sources"]  # label + box file hashes
    loc = m["localisation"]
    assert loc["overall"]["n_items"] > 0 and set(loc["per_finding"]) <= set(m["per_finding"])
    for k in ("pointing", "mass", "centre_pointing", "centre_mass", "uniform_mass"):
        assert 0 <= loc["overall"][k] <= 1
    for f in ("roc.png", "pr.png", "groups.png", "localisation.png", "gallery.png"):
        assert (out / "figures" / f).stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "figures/gallery.png" in html and "Pointing" not in html.split("<table>")[0]
    assert (out / "predictions_tiny_logistic.csv").is_file() and (out / "config.yaml").is_file()
    assert len(list((out / "cache").iterdir())) == 2  # one feature cache per backbone


def test_kermany_label_efficiency(tiny, data_root, tmp_path):
    out = tmp_path / "k"
    args = ["evaluate", "--task", "kermany", "--root", str(data_root / "kermany"), "--backbone", str(tiny),
            "--head", "logistic", "--protocol", "label-efficiency", "--fractions", "10,50,100", "--seeds", "0,1", "--limit", "80",
            "--bootstrap", "100", "--out", str(out), "--quiet"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [c["fraction"] for c in m["curve"]] == [0.1, 0.5, 1.0]
    assert m["curve"][0]["n_images_mean"] < m["curve"][-1]["n_images_mean"]
    assert len(m["runs"]) == 5 and m["per_finding"]["PNEUMONIA"]["auroc_ci"][0] is not None
    assert (out / "figures" / "label_efficiency.png").stat().st_size > 1000
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["protocol"] == "label-efficiency"
    # A rerun with the same --out reuses the cached features and reproduces every number.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*") if p.is_file()}
    assert stamps
    assert main(args) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["curve"] == m["curve"] and m2["per_finding"] == m["per_finding"]
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*") if p.is_file()} == stamps


def test_ood_nih_to_kermany(tiny, data_root, tmp_path):
    out = tmp_path / "ood"
    assert main(["evaluate", "--task", "nih14", "--root", str(data_root / "nih14"), "--backbone", str(tiny),
                 "--head", "logistic", "--protocol", "ood", "--ood-task", "kermany", "--ood-root", str(data_root / "kermany"),
                 "--limit", "40", "--bootstrap", "50", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["mapping"] == {"Pneumonia": "PNEUMONIA"} and list(m["per_finding"]) == ["PNEUMONIA"]
    assert list(m["in_distribution"]["per_finding"]) == ["PNEUMONIA"]  # same findings, B's names


def test_adapt_heads_and_glori_attention_for_localisation(tiny, data_root, tmp_path):
    """GLoRI and linear heads trained by the adapt stage's fit_heads on the feature cache; GLoRI's
    per-finding cross-attention is what the localisation protocol scores."""
    out = tmp_path / "glori"
    assert main(["evaluate", "--task", "nih14", "--root", str(data_root / "nih14"), "--backbone", str(tiny),
                 "--head", "glori", "--head", "linear", "--protocol", "localisation", "--limit", "20",
                 "--epochs", "2", "--lrs", "1e-3,1e-2", "--decoder-dim", "32", "--bootstrap", "50",
                 "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    g = m["models"]["tiny/glori"]["head"]
    assert g["trainer"] == "adapt-glori" and g["n_configs"] == 2
    assert m["models"]["tiny/linear"]["head"]["trainer"] == "adapt-linear"
    assert "cross-attention" in m["localisation"]["heatmap_source"]
    assert m["localisation"]["overall"]["n_items"] > 0
    # Adapt heads carry a calibrator: test calibration before it is reported beside after, AUROC unchanged.
    for label in ("tiny/glori", "tiny/linear"):
        before = m["models"][label]["calibration_before"]
        assert {"brier", "brier_ci", "ece", "ece_ci"} <= set(before["macro"]) and "ece" in m["models"][label]["macro"]
        assert before["max_abs_auroc_change"] == 0.0 or before["max_abs_auroc_change"] < 1e-6
    html = (out / "report.html").read_text()
    assert "before and after the post-hoc calibrator" in html and "reliability.png" in html


def test_cli_task_errors(tiny, data_root, tmp_path, capsys):
    assert main(["evaluate", "--task", "kermany", "--root", str(data_root / "kermany"), "--out", str(tmp_path)]) == 2
    assert "--backbone" in capsys.readouterr().err
    assert main(["evaluate", "--task", "kermany", "--root", str(data_root / "kermany"), "--backbone", "nope",
                 "--out", str(tmp_path)]) == 2
    assert "neither a file nor a registry name" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_localisation_geometry_end_to_end(tmp_path, mode):
    """Non-square images with a bright rectangle and a box on it: a heatmap equal to the transformed image must
    point inside the mapped box and put most of its mass there."""
    paths, ids = [], []
    rows = []
    for i, (h, w) in enumerate([(300, 200), (200, 320)]):
        img = np.full((h, w), 20, dtype=np.uint8)
        x0, y0 = 50 + 10 * i, 60
        img[y0:y0 + 50, x0:x0 + 40] = 255
        p = tmp_path / f"im{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
        ids.append(p.name)
        rows.append({"image_id": p.name, "finding": "Mass", "x": x0, "y": y0, "w": 40, "h": 50})
    tf = InputTransform(size=64, mode=mode)

    def image_as_heatmap(x):
        return (x[:, :1] - x.min()).numpy()

    scores, gallery, errors = collect_items(paths, ids, ["a", "b"], pd.DataFrame(rows), ["Mass", "Nodule"], tf,
                                            image_as_heatmap, gallery=2)
    assert not errors and len(scores) == 2 and len(gallery) == 2
    assert scores["pointing"].tolist() == [1.0, 1.0]
    assert (scores["mass"] > 3 * scores["uniform_mass"]).all()


def test_cls_attention_heatmaps_follow_the_attention(monkeypatch):
    """The class-agnostic map is the last block's CLS->patch attention, upsampled: force the attention onto
    one patch and the map must peak there."""
    from chexfound.evaluate.protocols.localisation import cls_attention_heatmaps

    torch.manual_seed(0)
    m = create_backbone("tiny_vit").eval()  # 64 px, 4x4 patches, 2 registers
    real = m.forward_features

    def fake(x, masks=None, return_attention=False):
        out = real(x, masks, return_attention)
        a = torch.zeros_like(out["attention"])
        a[:, :, 0, 1 + 2 + 6] = 1.0  # patch 6 = grid row 1, col 2
        out["attention"] = a
        return out

    monkeypatch.setattr(m, "forward_features", fake)
    hm = cls_attention_heatmaps(m)(torch.zeros(2, 3, 64, 64))
    assert hm.shape == (2, 1, 64, 64)
    y, x = np.unravel_index(hm[0, 0].argmax(), (64, 64))
    assert 32 <= x < 48 and 16 <= y < 32
