import numpy as np
import pytest
import torch
from PIL import Image

from chexfound.cli.main import main
from chexfound.errors import ConfigError
from chexfound.ssl.config import list_presets, load_config
from chexfound.ssl.data import PreloadedSource, Skipped, corpus_paths, load_preloaded
from chexfound.ssl.sampler import ShardedStreamSampler


def test_presets_load_and_overrides_are_checked():
    assert {"chexfound_vitl16_512", "vits16_cpu_smoke", "demo_tiny"} <= set(list_presets())
    for p in list_presets():
        load_config(p)
    cfg = load_config("vits16_cpu_smoke", ["optim.base_lr=1e-3", "crops.local_crops_scale=[0.1, 0.4]",
                                           "student.overrides.depth=2", "train.time_budget_s=null"])
    assert cfg["optim"]["base_lr"] == 1e-3 and cfg["crops"]["local_crops_scale"] == [0.1, 0.4]
    assert cfg["student"]["overrides"]["depth"] == 2 and cfg["train"]["time_budget_s"] is None
    with pytest.raises(ConfigError, match="optim.base_lrr"):
        load_config("vits16_cpu_smoke", ["optim.base_lrr=1"])
    with pytest.raises(ConfigError, match="centering"):
        load_config(None, ["centering=mean"])


def test_cli_prints_resolved_config(capsys):
    assert main(["pretrain", "--config", "vits16_cpu_smoke", "--print-config", "--batch-size", "7",
                 "--data", "/x", "ibot.loss_weight=0"]) == 0
    out = capsys.readouterr().out
    assert "batch_size_per_gpu: 7" in out and "loss_weight: 0" in out and "path: /x" in out
    assert main(["pretrain", "--config", "nope"]) == 2


def test_sources_folder_manifest_and_kermany_split(tmp_path, data_root, tiny_corpus):
    k = corpus_paths([{"path": str(data_root / "kermany")}], "train")
    assert len(k) == 5216 and all("/train/" in str(p) for p in k)  # labels.csv, official train split
    assert len(corpus_paths([{"path": str(data_root / "kermany"), "split": None}], None)) == 5840
    assert len(corpus_paths([{"path": str(tiny_corpus)}], "train")) == 21  # manifest; the test row dropped
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray((np.random.rand(40, 30) * 255).astype(np.uint8)).save(folder / "sub" / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert len(corpus_paths([{"path": str(folder)}], "train")) == 3  # folder without a manifest
    with pytest.raises(ConfigError):
        corpus_paths([{"path": str(tmp_path / "missing")}], None)
    nih = corpus_paths([{"path": str(data_root / "nih14"), "split": "dev",
                         "patient_split": {"fractions": [0.7, 0.3], "names": ["dev", "test"], "seed": 0}}], None)
    assert 300 < len(nih) < 450


def test_preload_skips_corrupt_files_and_caches(tmp_path, tiny_corpus):
    paths = corpus_paths([{"path": str(tiny_corpus)}], "train")
    sk = Skipped()
    imgs = load_preloaded(paths, 32, 0, tmp_path / "cache", sk)
    assert imgs.shape == (20, 1, 32, 32) and imgs.dtype.is_floating_point is False
    assert len(sk.items) == 1 and "corrupt.png" in sk.items[0][0]
    sk2 = Skipped()
    again = load_preloaded(paths, 32, 0, tmp_path / "cache", sk2)  # from the cache
    assert (again == imgs).all() and len(sk2.items) == 1


def test_a_corpus_of_unreadable_images_names_the_list_it_wrote(tmp_path, tiny_config):
    from chexfound.ssl import distributed as D
    from chexfound.ssl.data import open_corpus

    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "manifest.csv").write_text(f"path,patient_id,split\n{bad},bad,train\n")
    cfg = tiny_config("data.pipeline=preload", "data.cache=false")
    cfg["data"]["sources"] = [{"path": str(tmp_path / "manifest.csv")}]
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(ConfigError, match="none of the 1 images could be read") as e:
        open_corpus(cfg, out, D.DistInfo(), lambda s: None, quiet=True)
    listed = out / "skipped.csv"
    assert str(listed) in str(e.value) and "corrupt.png" in listed.read_text()


def test_sharded_sampler_is_a_partition_and_resumable():
    world, b, n = 3, 4, 25
    samplers = [ShardedStreamSampler(n, b, world, r, seed=1) for r in range(world)]
    steps = [np.concatenate([s.indices(t) for s in samplers]) for t in range(6)]
    stream = np.concatenate(steps)  # 72 positions = 2 full epochs + 22
    assert sorted(stream[:25]) == list(range(25)) and sorted(stream[25:50]) == list(range(25))
    fresh = ShardedStreamSampler(n, b, world, 2, seed=1)
    assert np.array_equal(fresh.indices(5), samplers[2].indices(5))  # no replay needed
    src = PreloadedSource(torch.arange(n).view(n, 1, 1, 1).to(torch.uint8), samplers[0], torch.device("cpu"))
    step, batch, _ = next(src.batches(4))
    assert step == 4 and batch.flatten().tolist() == samplers[0].indices(4).tolist()
