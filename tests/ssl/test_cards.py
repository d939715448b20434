"""Pretraining's teacher exports carry model cards: the files' facts, and the final probe comparison's numbers
exactly when the run measured them."""

from __future__ import annotations

import json
import re

import pytest

from chexfound.stats import read_comparisons
from chexfound.models import create_backbone
from chexfound.models.format import sha256_file
from chexfound.ssl.train import pretrain

EXPORTS = (("teacher_backbone.safetensors", "teacher_backbone.md"), ("teacher_checkpoint.pth", "teacher_checkpoint.md"))


def _facts(card: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| ([^|]+?) \| (.+) \|$", card, re.M)}


def _sha(value: str) -> str:
    return re.search(r"`([0-9a-f]{64})`", value).group(1)


def _check_identity(out, card: str, file: str) -> None:
    f = _facts(card)
    assert _sha(f["file SHA-256"]) == sha256_file(out / file)
    model = create_backbone(out / file)
    assert _sha(f["backbone weights SHA-256"]) == model.info.weights_sha256
    assert f["provenance"] == model.info.provenance() and "**Not for clinical use.**" in card


def test_cards_without_probes_have_no_results(tmp_path, tiny_corpus, tiny_config):
    cfg = tiny_config("optim.epochs=1")
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    pretrain(cfg, tmp_path, device="cpu", quiet=True)
    assert not (tmp_path / "probe_comparison.json").exists()
    for file, card_name in EXPORTS:
        card = (tmp_path / card_name).read_text()
        _check_identity(tmp_path, card, file)
        results = card.split("## Results", 1)[1].split("\n## ", 1)[0]
        assert "No measured results" in results and "###" not in results
        assert not re.search(r"(?<![\w.])\d\.\d{4}(?!\d)", card)


@pytest.mark.slow
def test_cards_carry_the_final_probe_comparison(tmp_path, tiny_corpus, tiny_config, data_root):
    cfg = tiny_config("optim.epochs=1", f"probe.kermany={data_root / 'kermany'}", "probe.n_evals=0",
                      "probe.final_n_train=40", "probe.final_n_test=40", "probe.final_random_seeds=1",
                      "probe.batch_size=20")
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    pretrain(cfg, tmp_path, device="cpu", quiet=True)
    comparison = json.loads((tmp_path / "probe_comparison.json").read_text())
    assert comparison
    for file, card_name in EXPORTS:
        card = (tmp_path / card_name).read_text()
        _check_identity(tmp_path, card, file)
        results = card.split("## Results", 1)[1].split("\n## ", 1)[0]
        assert "From `probe_comparison.json`" in results
        for task, c in read_comparisons(comparison).items():  # the one schema (chexfound.stats.comparison)
            assert f"### Linear probe: {task}" in results
            for m in c.models.values():
                assert f"| AUROC | {m.auroc:.4f} | [{m.auroc_ci[0]:.4f}, {m.auroc_ci[1]:.4f}] |" in results
            pairs = [p for p in c.paired.values() if p.error is None]
            for p in pairs:
                d = p.auroc
                assert f"| {d.diff:.4f} | [{d.ci[0]:.4f}, {d.ci[1]:.4f}] |" in results
            n_rows = len(c.models) + len(pairs)
            assert results.count("| AUROC |") + results.count("| paired AUROC difference |") == n_rows
