"""`chexfound adapt` end to end on real NIH images with a tiny random backbone."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from chexfound.adapt import GloriHead, LinearHead, load_head
from chexfound.cli.main import main
from chexfound.data.findings import NIH14
from chexfound.data.manifest import read_manifest
from chexfound.models.format import read_meta

SMALL = ["--decoder-dim", "32", "--ffn-dim", "32", "--num-heads", "2", "--batch-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, data_root):
    df = pd.read_csv(data_root / "nih14" / "labels.csv").head(40)
    df["path"] = [str(data_root / "nih14" / p) for p in df["path"]]
    d = tmp_path_factory.mktemp("m")
    df.to_csv(d / "train.csv", index=False)
    broken = d / "broken.png"
    broken.write_bytes(b"nope")
    bad = pd.concat([df, df.head(1).assign(path=str(broken), patient_id="bad")])
    bad.to_csv(d / "with_bad.csv", index=False)
    return d


def test_glori_then_linear_reuse_the_cache(manifest, tmp_path, monkeypatch):
    out = tmp_path / "run"
    rc = main(["adapt", "--config", "tiny_vit", "--train", str(manifest / "with_bad.csv"), "--val-split", "0.25",
               "--head", "glori", "--epochs", "2", "--lrs", "1e-3,1e-2", "--heatmaps", "2", "--heatmap-top-k", "1",
               "--out", str(out), *SMALL])
    assert rc == 0
    head = load_head(out / "glori.safetensors")
    meta = read_meta(out / "glori.safetensors")
    assert isinstance(head, GloriHead)
    assert head.findings == read_manifest(manifest / "train.csv").label_columns  # manifest column order
    assert set(head.findings) == {n.replace(" ", "_") for n in NIH14}
    assert meta["backbone_sha256"] and meta["transform"]["size"] == 64 and meta["n_blocks"] == 2
    assert meta["selection"]["lr"] in (1e-3, 1e-2)
    table = pd.read_csv(out / "glori.val_per_finding.csv")
    assert list(table.columns[:5]) == ["finding", "n_pos", "n_neg", "auroc", "ap"] and len(table) == 14
    assert len(pd.read_csv(out / "glori.grid.csv")) == 2
    assert len(list((out / "heatmaps" / "glori").glob("*.png"))) == 2
    assert pd.read_csv(out / "skipped.csv")["path"].str.endswith("broken.png").all()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"start", "cache", "done"} <= {r.get("event") for r in records}
    assert sum("val_macro_ap" in r for r in records) == 2 * 2
    # How every threshold was chosen: in the head file, the run log and the per-finding table.
    (thr,) = [r for r in records if r.get("event") == "thresholds"]
    assert [t["finding"] for t in thr["findings"]] == head.findings == [t["finding"] for t in meta["threshold_rules"]]
    # 10 validation images: too few positives for a validation-optimal threshold anywhere.
    assert set(table["threshold_rule"]) <= {"prevalence", "default", "none"}
    # A finding without validation positives gets no threshold (no call), never a degenerate one.
    nopos = table["n_pos"] == 0
    assert nopos.any() and (table.loc[nopos, "threshold_rule"] == "none").all()
    assert table.loc[nopos, "threshold"].isna().all() and table.loc[~nopos, "threshold"].notna().all()
    # Calibrator and informative verdict per finding: 10 validation images are too few to fit a calibrator.
    assert set(table["calibration"]) == {"none"} and meta["calibration"]["methods"] == ["none"] * 14
    assert table.loc[nopos, "informative"].eq(False).all() and "informative" in meta
    summary = json.loads((out / "glori.metrics.json").read_text())
    assert summary["val_images"] + summary["train_images"] == 41

    # A second head in the same folder: the features are not recomputed.
    import chexfound.models.embedder as engine_mod

    def fail(*a, **k):
        raise AssertionError("the backbone ran again")

    monkeypatch.setattr(engine_mod, "_forward_fn", fail)
    rc = main(["adapt", "--config", "tiny_vit", "--train", str(manifest / "with_bad.csv"), "--val-split", "0.25",
               "--head", "linear", "--avgpool", "--epochs", "2", "--lrs", "1e-2", "--out", str(out), *SMALL])
    assert rc == 0 and isinstance(load_head(out / "linear.safetensors"), LinearHead)
    assert len(pd.read_csv(out / "linear.val_per_finding.csv")) == 14 and (out / "glori.grid.csv").is_file()
    # --strict turns skipped images into a non-zero exit.
    rc = main(["adapt", "--config", "tiny_vit", "--train", str(manifest / "with_bad.csv"), "--val-split", "0.25",
               "--head", "linear", "--epochs", "1", "--lrs", "1e-2", "--out", str(out), "--strict", *SMALL])
    assert rc == 1


def test_split_column_and_backbone_file(manifest, tmp_path, tiny_backbone):
    from chexfound.models import backbone_sha256, save_backbone

    df = pd.read_csv(manifest / "train.csv")
    df["split"] = ["val" if i % 4 == 0 else "train" for i in range(len(df))]
    df.to_csv(tmp_path / "split.csv", index=False)
    save_backbone(tiny_backbone, tmp_path / "bb.safetensors")
    out = tmp_path / "run"
    rc = main(["adapt", "--backbone", str(tmp_path / "bb.safetensors"), "--train", str(tmp_path / "split.csv"),
               "--labels", "Atelectasis,Effusion", "--head", "mlp", "--hidden-dim", "16", "--epochs", "1",
               "--lrs", "1e-3", "--out", str(out), *SMALL])
    assert rc == 0
    summary = json.loads((out / "mlp.metrics.json").read_text())
    assert summary["val_images"] == 10 and summary["backbone_sha256"] == backbone_sha256(tiny_backbone)
    assert load_head(out / "mlp.safetensors").findings == ["Atelectasis", "Effusion"]
    assert main(["adapt", "--train", str(tmp_path / "split.csv"), "--out", str(out), "--quiet"]) == 2  # no backbone


def test_end_to_end_lora_run_writes_an_adapter_tied_to_its_base(manifest, tmp_path, tiny_backbone):
    from chexfound.adapt.adapter import apply_adapter, load_adapter
    from chexfound.models import backbone_sha256, create_backbone, save_backbone

    df = pd.read_csv(manifest / "train.csv").head(8)
    df["split"] = ["train"] * 6 + ["val"] * 2
    df.to_csv(tmp_path / "m.csv", index=False)
    save_backbone(tiny_backbone, tmp_path / "base.safetensors")
    out = tmp_path / "e2e"
    args = ["adapt", "--backbone", str(tmp_path / "base.safetensors"), "--train", str(tmp_path / "m.csv"),
            "--labels", "Atelectasis", "--task", "binary", "--head", "linear", "--finetune", "lora", "--epochs", "1",
            "--lrs", "1e-3", "--batch-size", "3", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    assert not (out / "linear.backbone.safetensors").exists()  # an adapter, not a copy
    adapter = load_adapter(out / "linear.adapter.safetensors")
    meta = read_meta(out / "linear.safetensors")
    assert adapter.method == "lora" and adapter.base_sha256 == backbone_sha256(tiny_backbone)
    assert meta["task"] == "binary" and meta["finetune"] == "lora" and meta["adapter"] == "linear.adapter.safetensors"
    assert set(adapter.tensors) == {f"blocks.{i}.attn.{m}.lora_{x}" for i in range(2) for m in ("qkv", "proj")
                                    for x in "ab"}
    # base + adapter is bitwise the backbone the head was trained with
    merged = apply_adapter(create_backbone(tmp_path / "base.safetensors"), adapter)
    assert backbone_sha256(merged) == meta["backbone_sha256"] == adapter.adapted_sha256
    # predict: base + adapter + head, no merged copy needed
    assert main(["predict", "--backbone", str(tmp_path / "base.safetensors"), "--adapter",
                 str(out / "linear.adapter.safetensors"), "--head", str(out / "linear.safetensors"),
                 "--out", str(tmp_path / "p.csv"), str(df["path"].iloc[0])]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == 1
    # the merged backbone on request, identical to base + adapter
    assert main([*args, "--out", str(tmp_path / "e2e-merged"), "--save-merged"]) == 0
    bb = create_backbone(tmp_path / "e2e-merged" / "linear.backbone.safetensors")
    assert backbone_sha256(bb) == read_meta(tmp_path / "e2e-merged" / "linear.safetensors")["backbone_sha256"]


@pytest.mark.parametrize("extra,message", [
    (["--metric", "r2"], "does not exist for a multilabel task"),
    (["--task", "survival", "--loss", "bce"], "does not fit a survival task"),
    (["--flip-augment"], "needs --flip-tta"),
    (["--config", "no_such_model"], "unknown backbone config"),
])
def test_bad_options_are_reported_before_any_work(manifest, tmp_path, capsys, extra, message):
    args = ["adapt", "--train", str(manifest / "train.csv"), "--out", str(tmp_path / "o"), "--quiet"]
    if "--config" not in extra:
        args += ["--config", "tiny_vit"]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "cache").exists()
