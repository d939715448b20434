"""Pretraining end to end on a tiny real corpus: exact resume, NaN stop, exports, stage initialisation."""

from __future__ import annotations

import json

import pytest
import torch

from chexfound.models import create_backbone
from chexfound.ssl.checkpoint import list_checkpoints, load_checkpoint
from chexfound.ssl.meta_arch import SSLMetaArch
from chexfound.ssl.train import NonFiniteLossError, pretrain


def _train_rows(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_corpus, tiny_config):
    out = tmp_path_factory.mktemp("full")
    cfg = tiny_config("checkpoint.export_block_chunks=2")
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    res = pretrain(cfg, out, device="cpu", quiet=True)
    return out, res, cfg


def test_run_writes_log_config_exports_and_skips_corrupt(full_run):
    out, res, _ = full_run
    assert res.iterations == 6
    for name in ("metrics.jsonl", "config.yaml", "teacher_backbone.safetensors", "teacher_checkpoint.pth",
                 "report.png", "skipped.csv"):
        assert (out / name).is_file(), name
    assert "corrupt.png" in (out / "skipped.csv").read_text()
    rows = _train_rows(out)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "dino_local_loss", "ibot_loss", "koleo_loss", "lr", "wd", "momentum", "teacher_temp",
                "grad_norm", "images_per_s", "teacher_entropy", "teacher_mean_entropy", "prototypes_in_use"):
        assert key in rows[0], key
    assert rows[0]["n_skipped"] == 1
    assert (out / "ckpt" / "ckpt_00000006.yaml").is_file()


def test_exports_match_the_teacher(full_run):
    out, _, cfg = full_run
    ck = load_checkpoint(list_checkpoints(out)[-1][1])
    model = create_backbone(out / "teacher_backbone.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ck["model"][f"teacher.backbone.{k}"])
    assert model.info.format == "chexfound" and model.info.config.img_size == 32
    orig = torch.load(out / "teacher_checkpoint.pth", weights_only=True)
    keys = set(orig["teacher"])
    # depth 2 in 2 chunks: block i sits at blocks.<chunk>.<i>, as the original's BlockChunk layout
    assert {"backbone.blocks.0.0.attn.qkv.weight", "backbone.blocks.1.1.attn.qkv.weight"} <= keys
    assert {"dino_head.last_layer.weight_g", "dino_head.last_layer.weight_v", "ibot_head.mlp.4.weight",
            "backbone.mask_token", "backbone.register_tokens"} <= keys


def test_resume_repeats_the_uninterrupted_run(full_run, tmp_path, tiny_corpus, tiny_config):
    ref_out, _, _ = full_run
    cfg = tiny_config()
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    first = pretrain(cfg, tmp_path, device="cpu", quiet=True, stop_after=3)
    assert first.stopped_early and [it for it, _ in list_checkpoints(tmp_path)] == [3]
    # A killed run leaves rows past its last checkpoint: they must be dropped on resume.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "iteration": 4, "loss": 123.0}) + "\n{\"kind\": \"tr")
    pretrain(cfg, tmp_path, device="cpu", quiet=True)
    a, b = _train_rows(ref_out), _train_rows(tmp_path)
    assert [r["iteration"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for k in ("loss", "dino_local_loss", "dino_global_loss", "ibot_loss", "koleo_loss", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["iteration"], k)
    ta = load_checkpoint(list_checkpoints(ref_out)[-1][1])["model"]
    tb = load_checkpoint(list_checkpoints(tmp_path)[-1][1])["model"]
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-6, atol=1e-7)


def test_a_checkpoint_of_the_earlier_state_form_still_resumes(full_run, tmp_path, tiny_corpus, tiny_config):
    """Checkpoints written before the typed run state (no version, the collapse warning's counts under a
    separate "monitor" key) resume as before: the run ends where the uninterrupted one does."""
    ref_out, _, _ = full_run
    cfg = tiny_config()
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    pretrain(cfg, tmp_path, device="cpu", quiet=True, stop_after=3)
    (_, path), = list_checkpoints(tmp_path)
    ck = load_checkpoint(path)
    st = ck["state"]
    assert st.pop("version") == 2
    st["monitor"] = st["heal"].pop("collapse")
    torch.save(ck, path)
    pretrain(cfg, tmp_path, device="cpu", quiet=True)
    a, b = _train_rows(ref_out), _train_rows(tmp_path)
    assert [r["iteration"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert b[-1]["loss"] == pytest.approx(a[-1]["loss"], rel=1e-6, abs=1e-7)
    assert load_checkpoint(list_checkpoints(tmp_path)[-1][1])["state"]["version"] == 2


def test_resume_refuses_a_different_recipe(tmp_path, tiny_corpus, tiny_config):
    from chexfound.errors import ConfigError

    cfg = tiny_config()
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    pretrain(cfg, tmp_path, device="cpu", quiet=True, stop_after=1)
    other = tiny_config("optim.base_lr=0.1")
    other["data"]["sources"] = cfg["data"]["sources"]
    with pytest.raises(ConfigError, match="optim.base_lr"):
        pretrain(other, tmp_path, device="cpu", quiet=True)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, tiny_corpus, monkeypatch, tiny_config):
    cfg = tiny_config("checkpoint.every=2")
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    real = SSLMetaArch.forward_losses
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        loss, stats = real(self, *a, **kw)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] >= 4 else (loss, stats)

    monkeypatch.setattr(SSLMetaArch, "forward_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match="iteration 3.*ckpt_00000002.pt"):
        pretrain(cfg, tmp_path, device="cpu", quiet=True)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [2]
    load_checkpoint(list_checkpoints(tmp_path)[0][1])  # intact and readable


def test_next_stage_interpolates_pos_embed(full_run, tmp_path, tiny_corpus, tiny_config):
    from chexfound.ssl.init_source import init_from_checkpoint

    out, _, _ = full_run
    ref = create_backbone(out / "teacher_backbone.safetensors")
    # From our training checkpoint, and from the original layout (chunked block keys).
    for src in (list_checkpoints(out)[-1][1], out / "teacher_checkpoint.pth"):
        meta = SSLMetaArch(tiny_config("crops.global_crops_size=48"))
        notes = init_from_checkpoint(meta.student, meta.teacher, src, "interpolate")
        assert any("interpolated to a 3x3 grid" in n for n in notes)
        torch.testing.assert_close(meta.teacher.backbone.blocks[1].attn.qkv.weight, ref.blocks[1].attn.qkv.weight)
        assert meta.teacher.backbone.pos_embed.shape == (1, 10, 64)
        torch.testing.assert_close(meta.teacher.backbone.pos_embed[:, 0], ref.pos_embed[:, 0])
    meta = SSLMetaArch(tiny_config("crops.global_crops_size=48"))
    before = meta.student.backbone.pos_embed.clone()
    notes = init_from_checkpoint(meta.student, meta.teacher, out / "teacher_checkpoint.pth", "reinit")
    assert any("re-initialised" in n for n in notes)
    torch.testing.assert_close(meta.student.backbone.pos_embed, before)
    # Wired through the run: one step of a 48 px stage started from the 32 px teacher.
    cfg = tiny_config("crops.global_crops_size=48", f"train.init_from={out / 'teacher_checkpoint.pth'}",
                      "optim.epochs=1", "train.epoch_length=1")
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    pretrain(cfg, tmp_path, device="cpu", quiet=True)
    model = create_backbone(tmp_path / "teacher_backbone.safetensors")
    assert model.pos_embed.shape == (1, 10, 64)


def test_bf16_shards_roundtrip(full_run, tmp_path):
    from chexfound.ssl.checkpoint import export_teacher_shards, load_backbone_shards

    out, _, cfg = full_run
    ck = load_checkpoint(list_checkpoints(out)[-1][1])
    meta_arch = SSLMetaArch(cfg)
    files = export_teacher_shards(tmp_path, ck["model"], meta_arch.vit_config, 0.25, {"note": "test"})
    assert len(files) > 1 and all(f.stat().st_size <= 0.25 * 2**20 for f in files)
    model, meta = load_backbone_shards(tmp_path)
    card = (tmp_path / "README.md").read_text()  # the shards' model card lists each with its SHA-256
    from chexfound.models.format import sha256_file

    assert all(f"`{f.name}` (SHA-256 `{sha256_file(f)}`)" in card for f in files)
    assert "load_backbone_shards" in card and "**Not for clinical use.**" in card
    ref = create_backbone(out / "teacher_backbone.safetensors")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v.to(torch.bfloat16).float())
    assert meta["n_shards"] == len(files) and meta["ssl"]["note"] == "test"


def test_checkpoints_keep_last_k_and_leave_no_temp_files(tmp_path):
    from chexfound.errors import CheckpointError
    from chexfound.ssl.checkpoint import save_checkpoint

    for it in (10, 20, 30, 40):
        save_checkpoint(tmp_path, it, {"model": {"w": torch.full((2,), float(it))}}, {"a": it}, keep_last=2)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [30, 40]
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["ckpt_00000030.pt", "ckpt_00000030.yaml", "ckpt_00000040.pt", "ckpt_00000040.yaml"]
    assert load_checkpoint(tmp_path / "ckpt" / "ckpt_00000040.pt")["model"]["w"][0] == 40.0
    bad = tmp_path / "ckpt" / "ckpt_00000050.pt"
    bad.write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="ckpt_00000050.pt"):
        load_checkpoint(bad)
