"""Continued pretraining (`pretrain --init-from SOURCE`): iteration 0 is exactly the source, heads come along
when the source has them, the architecture must match, and a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from chexfound.errors import ConfigError
from chexfound.models import save_backbone
from chexfound.ssl.checkpoint import list_checkpoints, load_checkpoint
from chexfound.ssl.init_source import init_from_checkpoint
from chexfound.ssl.config import diff_configs, load_config
from chexfound.ssl.meta_arch import SSLMetaArch
from chexfound.ssl.train import pretrain
from chexfound.ssl.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from ckpt_layouts import official_teacher, ssl_heads, tiny, to_chexfound_hub  # noqa: E402

# The tiny recipe with heads of the shapes `ssl_heads` writes (the release's key names, small sizes).
HEADS = ["dino.head_n_prototypes=32", "dino.head_hidden_dim=16", "dino.head_bottleneck_dim=8",
         "ibot.head_n_prototypes=32", "ibot.head_hidden_dim=16", "ibot.head_bottleneck_dim=6"]


def _features(backbone: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    m = copy.deepcopy(backbone).float().eval()  # eval: no stochastic depth in the student
    with torch.no_grad():
        return [t for pair in m.get_intermediate_layers(x, n=2, return_class_token=True) for t in pair]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random tiny ViT at the run's 32 px, as the release's teacher_checkpoint.pth (chunked blocks, heads),
    as the Hugging Face Hub release lays it out (`hub/`: model.safetensors + config.json; backbone only) and as
    one of our backbone files (no heads)."""
    d = tmp_path_factory.mktemp("source")
    model = tiny("tiny_vit", seed=3, img_size=32)
    heads = ssl_heads(64, seed=4)
    torch.save(official_teacher(model.state_dict(), depth=2, chunks=2, heads=heads), d / "teacher_checkpoint.pth")
    save_backbone(model, d / "backbone.safetensors")
    from safetensors.torch import save_file

    (d / "hub").mkdir()
    save_file(to_chexfound_hub(model.state_dict()), d / "hub" / "model.safetensors")
    # a tiny model's head count is not implied by its shapes: the folder's config.json states it
    (d / "hub" / "config.json").write_text(json.dumps({"num_heads": model.cfg.num_heads}))
    return model, heads, d


def _run_capturing_iteration_0(cfg, out, monkeypatch, stop_after=1):
    """Run `pretrain` and keep the backbones' features and the heads as they are when iteration 0 starts."""
    seen = {}
    real = Trainer.train_step
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def step(self, k, *a, **kw):
        if not seen:
            seen.update(k=k, teacher=_features(self.meta.teacher.backbone, x),
                        student=_features(self.meta.student.backbone, x),
                        teacher_heads={n: v.clone() for n, v in self.meta.teacher.state_dict().items()
                                       if not n.startswith("backbone.")},
                        student_heads={n: v.clone() for n, v in self.meta.student.state_dict().items()
                                       if not n.startswith("backbone.")})
        return real(self, k, *a, **kw)

    monkeypatch.setattr(Trainer, "train_step", step)
    pretrain(cfg, out, device="cpu", quiet=True, stop_after=stop_after)
    monkeypatch.undo()
    return seen, x


@pytest.mark.parametrize("layout", ["teacher_checkpoint.pth", "hub", "backbone.safetensors"])
def test_iteration_0_is_the_source(layout, source, tmp_path, tiny_corpus, tiny_config, monkeypatch):
    model, heads, d = source
    cfg = tiny_config(*HEADS, f"train.init_from={d / layout}")
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    seen, x = _run_capturing_iteration_0(cfg, tmp_path, monkeypatch)
    assert seen["k"] == 0
    want = _features(model, x)
    for side in ("teacher", "student"):
        for got, ref in zip(seen[side], want, strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    log = (tmp_path / "pretrain.log").read_text()
    if layout == "teacher_checkpoint.pth":  # the release's heads come along, into both sides
        for side in ("teacher_heads", "student_heads"):
            assert set(seen[side]) == set(heads)
            for k, v in heads.items():
                torch.testing.assert_close(seen[side][k], v, rtol=0, atol=0)
        assert "with its DINO/iBOT heads" in log
    else:  # fresh heads, the same on both sides (the teacher starts as the student), and the log says so
        assert "backbone only: DINO/iBOT heads freshly initialised" in log
        assert "dino_head, ibot_head freshly initialised" in log
        for k, v in seen["teacher_heads"].items():
            torch.testing.assert_close(seen["student_heads"][k], v, rtol=0, atol=0)
            if k in heads:
                assert not torch.equal(v, heads[k])


def test_cli_option_sets_init_from(source):
    from chexfound.cli.commands.pretrain import build_config
    from chexfound.cli.main import build_parser

    _, _, d = source
    args = build_parser().parse_args(["pretrain", "--config", "continue_vitl16_512", "--init-from",
                                      str(d / "teacher_checkpoint.pth"), "--out", "x"])
    assert build_config(args)["train"]["init_from"] == str(d / "teacher_checkpoint.pth")


def test_another_architecture_is_refused_naming_both(source, tmp_path, tiny_config):
    _, _, d = source
    deeper = tiny("tiny_vit", seed=1, img_size=32, depth=3)
    save_backbone(deeper, tmp_path / "deep.safetensors")
    torch.save(official_teacher(deeper.state_dict(), depth=3, chunks=0, heads={}), tmp_path / "deep.pth")
    for src, says in ((tmp_path / "deep.safetensors", "the source is tiny_vit"),  # a recorded config
                      (tmp_path / "deep.pth", "the source's shapes say")):  # shapes only
        meta = SSLMetaArch(tiny_config(*HEADS))
        with pytest.raises(ConfigError, match=rf"{says} \(.*depth=3.*this run's backbone .*depth=2.*differ in depth"):
            init_from_checkpoint(meta.student, meta.teacher, src, "interpolate")
    # The head count is not in the shapes: one of our runs records it (its checkpoint's config).
    meta = SSLMetaArch(tiny_config(*HEADS, "student.overrides={num_heads: 4}"))
    with pytest.raises(ConfigError, match="differ in num_heads"):
        init_from_checkpoint(meta.student, meta.teacher, d / "backbone.safetensors", "interpolate")
    meta = SSLMetaArch(tiny_config(*HEADS))
    with pytest.raises(ConfigError, match="named architecture has no weights"):
        init_from_checkpoint(meta.student, meta.teacher, "tiny_vit", "interpolate")


def test_a_missing_source_is_refused_before_the_corpus_is_read(tmp_path, tiny_config, monkeypatch):
    import chexfound.ssl.train as train_mod

    def no_corpus(*a, **kw):
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(train_mod, "open_corpus", no_corpus)
    cfg = tiny_config(f"train.init_from={tmp_path / 'missing' / 'teacher_checkpoint.pth'}")
    with pytest.raises(ConfigError, match="no such file or folder"):
        pretrain(cfg, tmp_path / "run", device="cpu", quiet=True)


def test_a_run_folder_continues_its_student_and_teacher(source, tmp_path, tiny_corpus, tiny_config):
    _, _, d = source
    cfg = tiny_config(*HEADS, f"train.init_from={d / 'teacher_checkpoint.pth'}", "optim.epochs=1")
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    pretrain(cfg, tmp_path / "first", device="cpu", quiet=True)
    ck = load_checkpoint(list_checkpoints(tmp_path / "first")[-1][1])["model"]
    meta = SSLMetaArch(tiny_config(*HEADS))
    notes = init_from_checkpoint(meta.student, meta.teacher, tmp_path / "first", "interpolate")
    assert "run checkpoint" in notes[0] and not any("assumed" in n for n in notes)  # its config is recorded
    for side in ("student", "teacher"):
        for k, v in getattr(meta, side).state_dict().items():
            torch.testing.assert_close(v, ck[f"{side}.{k}"], rtol=0, atol=0)


def test_resuming_an_init_from_run_is_exact(source, tmp_path, tiny_corpus, tiny_config):
    _, _, d = source
    cfg = tiny_config(*HEADS, f"train.init_from={d / 'teacher_checkpoint.pth'}")
    cfg["data"]["sources"] = [{"path": str(tiny_corpus)}]
    pretrain(cfg, tmp_path / "whole", device="cpu", quiet=True)
    first = pretrain(cfg, tmp_path / "cut", device="cpu", quiet=True, stop_after=3)
    assert first.stopped_early
    pretrain(cfg, tmp_path / "cut", device="cpu", quiet=True)
    assert "resuming from" in (tmp_path / "cut" / "pretrain.log").read_text()
    a = load_checkpoint(list_checkpoints(tmp_path / "whole")[-1][1])["model"]
    b = load_checkpoint(list_checkpoints(tmp_path / "cut")[-1][1])["model"]
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_continue_preset_is_the_released_recipe_with_gentler_optimisation():
    released, cont = load_config("chexfound_vitl16_512"), load_config("continue_vitl16_512")
    assert set(diff_configs(released, cont)) == {
        "_preset", "checkpoint.every", "optim.base_lr", "optim.epochs", "optim.warmup_epochs",
        "teacher.momentum_teacher", "teacher.warmup_teacher_temp", "teacher.warmup_teacher_temp_epochs"}
    o, r = cont["optim"], released["optim"]
    assert o["base_lr"] < r["base_lr"] and o["warmup_epochs"] < r["warmup_epochs"]
    assert o["freeze_last_layer_epochs"] >= 1
    assert cont["teacher"]["warmup_teacher_temp"] == cont["teacher"]["teacher_temp"]


@pytest.mark.slow
def test_two_ranks_under_ddp_and_fsdp_start_from_the_source(source, tmp_path, tiny_corpus, tiny_config):
    """Each rank loads the source; under FSDP2 each takes its shard. At learning rate 0 nothing moves, so the
    exported teacher (backbone and heads) must be the source exactly."""
    import os
    import subprocess

    import yaml

    model, heads, d = source
    cfg = tiny_config(*HEADS, "train.batch_size_per_gpu=4", "optim.epochs=1", "train.epoch_length=2")
    cfg.pop("_preset")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "dist_init_worker.py"), str(tmp_path), str(tiny_corpus),
           str(tmp_path / "tiny.yaml"), str(d / "teacher_checkpoint.pth")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from chexfound.models import create_backbone

    for mode in ("ddp", "fsdp"):
        exported = create_backbone(tmp_path / mode / "teacher_backbone.safetensors").state_dict()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(exported[k], v, rtol=0, atol=0, msg=f"{mode} {k}")
        teacher = torch.load(tmp_path / mode / "teacher_checkpoint.pth", weights_only=True)["teacher"]
        for k, v in heads.items():
            torch.testing.assert_close(teacher[k], v, rtol=0, atol=0, msg=f"{mode} {k}")
