"""Inference precision: bf16 and int8 backbones against fp32 on tiny models, and the refusal where the CPU
lacks the instructions that make them fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chexfound.errors import ConfigError
from chexfound.models import create_backbone
from chexfound.models import precision as P
from chexfound.models.fast import inference_nbytes, pack_for_inference
from chexfound.models.inference import InferenceSettings, prepare_backbone


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_backbone(name).eval()
    for mod in m.modules():  # LayerScale 1: every block changes the features (1e-5 would hide any error)
        if hasattr(mod, "gamma"):
            torch.nn.init.ones_(mod.gamma)
    return m


def _cls_patch(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        patches, cls = m.get_intermediate_layers(x, n=1, return_class_token=True)[0]
    return cls.float(), patches.float()


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_vit_mlp"])
@pytest.mark.parametrize("precision,tol", [("bf16", 0.999), ("int8", 0.995)])
def test_low_precision_close_to_fp32(name: str, precision: str, tol: float) -> None:
    m = _model(name)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref_cls, ref_patch = _cls_patch(m, x)
    fast = prepare_backbone(m, "cpu", InferenceSettings(compute=precision))
    assert fast is not m and getattr(fast, "precision") == precision
    cls, patch = _cls_patch(fast, x)
    cos = torch.nn.functional.cosine_similarity
    assert cos(cls, ref_cls).min() > tol
    assert cos(patch.flatten(0, 1), ref_patch.flatten(0, 1)).min() > tol - 0.005
    assert not torch.equal(cls, ref_cls)  # it really ran at lower precision
    # the source model is untouched (same outputs, still trainable)
    assert torch.equal(_cls_patch(m, x)[0], ref_cls) and all(p.requires_grad for p in m.parameters())


def test_int8_weights_are_a_quarter() -> None:
    m = _model("tiny_vit_mlp")
    fp32 = inference_nbytes(pack_for_inference(m, torch.float32))
    int8 = inference_nbytes(pack_for_inference(m, "int8"))
    block_fp32 = sum(p.numel() * 4 for b in m.blocks for p in b.parameters())
    # int8 saves 3 bytes per Linear weight; the rest (LayerNorm, per-channel scales, biases) stays fp32
    assert fp32 - int8 > 0.7 * block_fp32


def test_refused_without_the_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(P.platform, "machine", lambda: "x86_64")
    with pytest.raises(ConfigError, match="avx512_vnni"):
        P.check_precision("int8", "cpu")
    with pytest.raises(ConfigError, match="avx512_bf16"):
        P.check_precision("bf16", "cpu")
    assert P.check_precision("int8", "cpu", allow_slow=True) == "int8"
    assert P.check_precision("fp32", "cpu") == "fp32"
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx2", "avx_vnni"}))
    assert P.check_precision("int8", "cpu") == "int8"
    with pytest.raises(ConfigError, match="one of"):
        P.check_precision("fp16", "cpu")


def test_int8_linear_leaves_its_input_alone() -> None:
    from chexfound.models.fast import _Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48)
    x = torch.randn(5, 7, 32)
    before = x.clone()
    y = _Int8Linear(lin)(x)
    assert torch.equal(x, before)  # only consume=True may quantize in place
    ref = lin(x)
    assert y.shape == ref.shape and ((y - ref).norm() / ref.norm()) < 0.02


def test_embed_cli_int8_on_real_images(data_root: Path, tmp_path: Path) -> None:
    """`embed --precision int8` on shared NIH images: pooled features within a stated tolerance of fp32."""
    import numpy as np

    from chexfound.cli.main import main
    from chexfound.models import save_backbone
    from chexfound.models.pooled_file import read_features

    images = [str(p) for p in sorted((data_root / "nih14-fullres" / "images").glob("*.png"))[:4]]
    assert len(images) == 4
    bb = tmp_path / "bb.safetensors"
    save_backbone(_model("tiny_vit"), bb)  # LayerScale 1: the blocks matter
    feats = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.npz"
        assert main(["embed", *images, "--backbone", str(bb), "--precision", precision, "--out", str(out),
                     "--quiet"]) == 0
        feats[precision] = read_features(out)
    assert feats["int8"]["meta"]["autocast"] == "int8"
    a, b = feats["fp32"]["cls"].reshape(4, -1), feats["int8"]["cls"].reshape(4, -1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.995 and not np.array_equal(a, b)
