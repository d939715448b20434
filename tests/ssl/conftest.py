"""A tiny real corpus (Kermany images + one corrupt file) and a tiny recipe for pretraining tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from chexfound.ssl.config import load_config

TINY = [
    "student.arch=tiny_vit",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=48", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
    "ibot.separate_head=true",
    "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
    "train.batch_size_per_gpu=6", "train.epoch_length=3", "optim.epochs=2", "optim.warmup_epochs=0.5",
    "optim.freeze_last_layer_epochs=0.4", "teacher.warmup_teacher_temp_epochs=1",
    "train.log_every=1", "checkpoint.every=0", "data.num_workers=0", "probe.kermany=null",
    "augment.overrides={interpolation: bilinear}",
]


def _tiny_config(*extra: str) -> dict:
    return load_config(None, [*TINY, *extra])


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: tiny_config("key=value", ...) -> a resolved config of the tiny recipe."""
    return _tiny_config


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, data_root) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    imgs = sorted((data_root / "kermany" / "dataset" / "train" / "NORMAL").glob("*.jpeg"))[:10]
    imgs += sorted((data_root / "kermany" / "dataset" / "train" / "PNEUMONIA").glob("*.jpeg"))[:10]
    bad = d / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = ["path,patient_id,split"] + [f"{p},{p.stem},train" for p in imgs] + [f"{bad},bad,train"]
    rows.append(f"{imgs[0]},held_out,test")  # a row of another split: not used for pretraining
    (d / "manifest.csv").write_text("\n".join(rows) + "\n")
    return d / "manifest.csv"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and the CI machine is shared)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
