"""Model cards: every writer leaves one beside the model, its facts are the file's, and its numbers are the
run's (none when the run measured none)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from chexfound.adapt import LinearHead, load_head, save_head
from chexfound.cli.main import main
from chexfound.data.findings import NIH14
from chexfound.errors import ConfigError
from chexfound.models import backbone_sha256, create_backbone, save_backbone
from chexfound.models.card import card_path
from chexfound.models.card_results import results_from_file
from chexfound.models.format import sha256_file


def facts(card: str) -> dict[str, str]:
    """The card's identity table: {key: value without backticks}."""
    out = {}
    for line in card.splitlines():
        m = re.match(r"^\| ([^|]+) \| (.+) \|$", line)
        if m and m.group(1).strip() not in ("", "---"):
            out[m.group(1).strip()] = m.group(2).strip()
    return out


def sha_in(value: str) -> str:
    return re.search(r"`([0-9a-f]{64})`", value).group(1)


def results_section(card: str) -> str:
    return card.split("## Results", 1)[1].split("\n## ", 1)[0]


def assert_common(card: str) -> None:
    assert "**Not for clinical use.**" in card
    for section in ("## The model", "## Data and licences", "## Intended use", "## Results", "## Input transform",
                    "## How to load"):
        assert section in card, section


def assert_no_results(card: str) -> None:
    sec = results_section(card)
    assert "No measured results" in sec and "###" not in sec
    assert not re.search(r"(?<![\w.])\d\.\d{4}(?!\d)", card)  # no measured-looking number anywhere


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    d = tmp_path_factory.mktemp("card")
    torch.manual_seed(0)
    model = create_backbone("tiny_vit").eval()
    sha = save_backbone(model, d / "bb.safetensors",
                        extra={"ssl": {"preset": "demo_tiny", "iterations": 7, "n_images": 20,
                                       "data": ["/data/nih14/manifest.csv", "/data/kermany"]}})
    return model, sha, d / "bb.safetensors"


def test_backbone_card_states_the_files_facts(backbone):
    model, sha, path = backbone
    assert card_path(path) == path.with_suffix(".md") and path.with_suffix(".md").is_file()
    card = path.with_suffix(".md").read_text()
    f = facts(card)
    assert sha_in(f["file SHA-256"]) == sha == sha256_file(path)
    loaded = create_backbone(path)
    assert sha_in(f["backbone weights SHA-256"]) == loaded.info.weights_sha256 == backbone_sha256(model)
    assert f["backbone"] == f"`{loaded.info.name}`" and f["input size"] == "64 x 64 px"
    assert f"({loaded.info.num_params:,})" in f["backbone parameters"]
    assert "width 64, depth 2, 2 attention heads, 2 register tokens, SwiGLU" in f["architecture"]
    assert f["provenance"] == loaded.info.provenance()
    assert "NIH ChestX-ray14" in card and "CC BY 4.0" in card  # both datasets recognised in the recorded paths
    assert 'create_backbone("bb.safetensors")' in card
    assert_common(card)
    assert_no_results(card)


def test_head_card_from_an_adapt_run_carries_its_validation_numbers(tmp_path, data_root):
    df = pd.read_csv(data_root / "nih14" / "labels.csv").head(24)
    df["path"] = [str(data_root / "nih14" / p) for p in df["path"]]
    df.to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "run"
    rc = main(["adapt", "--config", "tiny_vit", "--train", str(tmp_path / "train.csv"), "--val-split", "0.25",
               "--head", "linear", "--epochs", "1", "--lrs", "1e-3", "--batch-size", "16", "--out", str(out),
               "--quiet"])
    assert rc == 0
    head_file = out / "linear.safetensors"
    card = (out / "linear.md").read_text()
    f = facts(card)
    assert sha_in(f["file SHA-256"]) == sha256_file(head_file)
    summary = json.loads((out / "linear.metrics.json").read_text())
    recorded = load_head(head_file).info.backbone_sha256
    assert sha_in(f["backbone weights SHA-256"]) == summary["backbone_sha256"] == recorded
    head = load_head(head_file)
    for name, t in zip(head.findings, head.thresholds.tolist()):
        shown = "none \\(no call\\)" if math.isnan(t) else f"{t:.4f}"  # no validation evidence: no threshold
        assert re.search(rf"^\| {re.escape(name)} \| {shown} \| ", card, re.M), name
    sec = results_section(card)
    assert "From `linear.metrics.json`" in sec
    assert f"Selected by validation {summary['metric']}: {summary['best'][summary['metric']]:.4f}." in sec
    for r in summary["per_finding"]:
        cells = [r["finding"], str(r["n_pos"]), str(r["n_neg"])] + [
            "n/a" if r[k] is None or r[k] != r[k] else f"{r[k]:.4f}" for k in ("auroc", "ap")]
        assert "| " + " | ".join(cells) + " |" in sec, r["finding"]
    assert_common(card)


def test_head_saved_without_results_says_so(backbone, tmp_path):
    model, _, _ = backbone
    head = LinearHead(NIH14, n_blocks=2, embed_dim=model.embed_dim)
    sha = save_head(head, tmp_path / "h.safetensors", backbone_sha256=backbone_sha256(model),
                    backbone_config=model.cfg.to_dict())
    card = (tmp_path / "h.md").read_text()
    assert sha_in(facts(card)["file SHA-256"]) == sha
    assert "No measured results" in results_section(card) and "###" not in results_section(card)
    assert_common(card)


@pytest.fixture(scope="module")
def evaluated(backbone, tmp_path_factory, data_root):
    """A head on the backbone, its predictions on real images, and `evaluate`'s scoring of them."""
    model, _, bb = backbone
    d = tmp_path_factory.mktemp("eval")
    head = LinearHead(NIH14, n_blocks=2, embed_dim=model.embed_dim, avgpool=True)
    torch.nn.init.normal_(head.linear.weight, std=0.2)
    save_head(head, d / "h.safetensors", backbone_sha256=backbone_sha256(model), backbone_config=model.cfg.to_dict())
    labels = pd.read_csv(data_root / "nih14" / "labels.csv").head(30)
    labels["path"] = [str(data_root / "nih14" / p) for p in labels["path"]]
    labels.to_csv(d / "test.csv", index=False)
    assert main(["predict", "--backbone", str(bb), "--head", str(d / "h.safetensors"), "--manifest",
                 str(d / "test.csv"), "--out", str(d / "preds.csv"), "--quiet"]) == 0
    assert main(["evaluate", "--predictions", str(d / "preds.csv"), "--labels", str(d / "test.csv"), "--out",
                 str(d / "eval"), "--quiet"]) == 0
    return d


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_export_card_with_evaluate_results(fmt, backbone, evaluated, tmp_path):
    _, _, bb = backbone
    out = tmp_path / f"model.{fmt}"
    metrics = evaluated / "eval" / "metrics.json"
    assert main(["export", "--format", fmt, "--backbone", str(bb), "--head", str(evaluated / "h.safetensors"),
                 "--out", str(out), "--results", str(metrics)]) == 0
    card = (tmp_path / "model.md").read_text()
    f = facts(card)
    assert sha_in(f["file SHA-256"]) == sha256_file(out)
    assert sha_in(f["backbone weights SHA-256"]) == create_backbone(bb).info.weights_sha256
    m = json.loads(metrics.read_text())
    sec = results_section(card)
    assert "From `metrics.json`" in sec
    row = f"| macro | {m['macro']['auroc']:.4f} | [{m['macro']['auroc_ci'][0]:.4f}, {m['macro']['auroc_ci'][1]:.4f}] |"
    assert row in sec
    assert ("onnxruntime" in card) == (fmt == "onnx") and ("from_bundle" in card) == (fmt == "safetensors")
    assert_common(card)


def test_export_refuses_results_of_another_backbone(backbone, evaluated, tmp_path, capsys):
    _, _, bb = backbone
    m = json.loads((evaluated / "eval" / "metrics.json").read_text())
    m.setdefault("provenance", {})["backbone_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(m))
    assert main(["export", "--format", "safetensors", "--backbone", str(bb), "--head", str(evaluated / "h.safetensors"),
                 "--out", str(tmp_path / "m.safetensors"), "--results", str(tmp_path / "other.json")]) != 0
    assert "measured on backbone 000000000000" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.md").exists()
    (tmp_path / "junk.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ConfigError, match="not a results file"):
        results_from_file(tmp_path / "junk.json")


def test_convert_writes_a_card(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from ckpt_layouts import official_teacher, ssl_heads, tiny

    model = tiny("tiny_vit", seed=2)
    torch.save(official_teacher(model.state_dict(), 2, 0, ssl_heads(64)), tmp_path / "teacher_checkpoint.pth")
    assert main(["convert", str(tmp_path / "teacher_checkpoint.pth"), "--arch", "tiny_vit",
                 "--out", str(tmp_path / "c.safetensors")]) == 0
    card = (tmp_path / "c.md").read_text()
    assert sha_in(facts(card)["file SHA-256"]) == sha256_file(tmp_path / "c.safetensors")
    assert "converted from" in facts(card)["provenance"] and "Apache-2.0" in card
    assert_no_results(card)


def test_a_folder_model_gets_readme_with_hub_header(backbone, tmp_path):
    from chexfound.models.card import ModelFile, write_card

    model, _, path = backbone
    folder = tmp_path / "hf"
    folder.mkdir()
    card = write_card(ModelFile(folder, "hf", sha256_file(path)), create_backbone(path).info)
    assert card == folder / "README.md" == card_path(folder)
    text = card.read_text()
    assert text.startswith("---\nlibrary_name: transformers\n") and "license:" not in text.split("---")[1]
    assert "AutoModel.from_pretrained" in text
    assert_common(text)
