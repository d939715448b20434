"""`export --format hf`: transformers loads the folder with no custom code and computes our features; a linear
head becomes *ForImageClassification; a LoRA adapter round-trips through peft. transformers and peft are test
dependencies here (the `hf` extra); the range covered is `chexfound.models.to_hf.TRANSFORMERS_TESTED`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chexfound.adapt import GloriHead, LinearHead, save_head
from chexfound.adapt.adapter import adapter_from_model, load_adapter, save_adapter
from chexfound.adapt.finetune import LoRALinear, apply_lora
from chexfound.cli.main import main
from chexfound.errors import ConfigError
from chexfound.models import backbone_sha256, create_backbone, save_backbone
from chexfound.models.to_hf import TRANSFORMERS_TESTED
from chexfound.serve.hf_export import export_hf, hf_classifier_problem
from chexfound.serve.peft_export import export_peft_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
if int(transformers.__version__.split(".")[0]) != 5:  # the in-memory module names peft targets are transformers 5's
    pytest.skip(f"tests cover transformers {TRANSFORMERS_TESTED}, found {transformers.__version__}",
                allow_module_level=True)


def _random_backbone(tmp: Path, name: str, seed: int = 0, **over):
    """A backbone whose every parameter is random (LayerScale, biases, tokens too, so a wrong mapping of any of
    them shows), saved and read back as a user's file is."""
    torch.manual_seed(seed)
    m = create_backbone(name, **over)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(0.0, 0.5 if ("gamma" in n or "norm" in n) else 0.2)
    path = tmp / f"{name}-{seed}.safetensors"
    save_backbone(m, path)
    return create_backbone(path).eval(), path


def _ours(model, x):
    with torch.no_grad():
        out = model.forward_features(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def _load(folder: Path, cls=None):
    cls = cls or transformers.AutoModel
    model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("name,over,hf_class", [
    ("tiny_vit", {}, "Dinov2WithRegistersModel"),            # registers, SwiGLU, LayerScale, patch 16
    ("tiny_vit_mlp", {}, "Dinov2Model"),                     # no registers, GELU MLP, no LayerScale
    ("tiny_vit", {"patch_size": 14, "img_size": 56}, "Dinov2WithRegistersModel"),
    ("tiny_vit_mlp", {"patch_size": 14, "img_size": 56, "qkv_bias": False, "proj_bias": False, "ffn_bias": False},
     "Dinov2Model"),
])
def test_transformers_loads_the_export_and_computes_our_features(tmp_path, name, over, hf_class):
    model, _ = _random_backbone(tmp_path, name, **over)
    out = tmp_path / "hf"
    result = export_hf(model, out)
    assert result["class"] == hf_class and result["verified"] and max(result["max_abs_diff"].values()) <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "preprocessor_config.json"]
    hf = _load(out)
    assert type(hf).__name__ == hf_class
    s, r = model.cfg.img_size, model.cfg.num_register_tokens
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = hf(pixel_values=x).last_hidden_state
    cls, patches = _ours(model, x)
    assert hidden.shape[1] == 1 + r + (s // model.cfg.patch_size) ** 2
    torch.testing.assert_close(hidden[:, 0], cls, rtol=0, atol=1e-4)
    torch.testing.assert_close(hidden[:, 1 + r:], patches, rtol=0, atol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["chexfound"]["weights_sha256"] == backbone_sha256(model)
    card = (out / "README.md").read_text()
    assert backbone_sha256(model) in card and "Not for clinical use" in card and "Apache-2.0" in card
    assert "ChestX-ray14" in card and "CC BY 4.0" in card and "per-image min-max" in card


def test_a_wrong_mapping_fails_the_export_check(tmp_path, monkeypatch):
    import chexfound.serve.hf_export as hx

    model, _ = _random_backbone(tmp_path, "tiny_vit")
    real = hx.hf_state_dict

    def swapped(m, prefix=""):  # query and key exchanged: loads fine, computes something else
        sd = real(m, prefix)
        k = "encoder.layer.0.attention.attention."
        sd[k + "query.weight"], sd[k + "key.weight"] = sd[k + "key.weight"], sd[k + "query.weight"]
        return sd

    monkeypatch.setattr(hx, "hf_state_dict", swapped)
    with pytest.raises(Exception, match="differ from chexfound"):
        export_hf(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_chexfound_vitl16_shape_round_trips_at_512(tmp_path):
    """The CheXFound ViT-L/16 shape (24 blocks, 1024 wide, 4 registers, SwiGLU 2736, 512 px) on random weights."""
    torch.manual_seed(0)
    model = create_backbone("chexfound_vitl16_reg4_512").eval()
    with torch.no_grad():
        for blk in model.blocks:  # LayerScale away from 1e-5 so every block shows in the output
            blk.ls1.gamma.normal_(0.0, 0.3)
            blk.ls2.gamma.normal_(0.0, 0.3)
        model.register_tokens.normal_()
    model.info.weights_sha256 = backbone_sha256(model)
    out = tmp_path / "vitl"
    export_hf(model, out, verify=False)
    hf = _load(out)
    assert type(hf).__name__ == "Dinov2WithRegistersModel"
    assert hf.encoder.layer[0].mlp.gate_proj.out_features == 2736
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = hf(pixel_values=x).last_hidden_state
    cls, patches = _ours(model, x)
    torch.testing.assert_close(hidden[:, 0], cls, rtol=0, atol=1e-4)
    torch.testing.assert_close(hidden[:, 5:], patches, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_vit_mlp"])
def test_linear_head_exports_as_image_classification(tmp_path, name):
    model, _ = _random_backbone(tmp_path, name)
    head = LinearHead(["Effusion", "Nodule", "Mass"], n_blocks=1, embed_dim=model.embed_dim, avgpool=True)
    torch.nn.init.normal_(head.linear.weight, std=0.5)
    torch.nn.init.normal_(head.linear.bias)
    head.thresholds.copy_(torch.tensor([0.2, 0.4, 0.6]))
    save_head(head, tmp_path / "h.safetensors", backbone_sha256=backbone_sha256(model))
    from chexfound.adapt import load_head

    head = load_head(tmp_path / "h.safetensors")
    out = tmp_path / "cls"
    result = export_hf(model, out, head=head)
    assert result["class"].endswith("ForImageClassification") and result["max_abs_diff"]["logits"] <= 1e-4
    hf = _load(out, transformers.AutoModelForImageClassification)
    assert hf.config.id2label == {0: "Effusion", 1: "Nodule", 2: "Mass"}
    assert hf.config.problem_type == "multi_label_classification"
    assert hf.config.chexfound["thresholds"] == pytest.approx([0.2, 0.4, 0.6])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = head(model.get_intermediate_layers(x, n=1, return_class_token=True))
        torch.testing.assert_close(hf(pixel_values=x).logits, logits, rtol=0, atol=1e-4)


def test_heads_transformers_cannot_express_are_refused_with_the_reason(tmp_path):
    model, _ = _random_backbone(tmp_path, "tiny_vit")
    four = LinearHead(["A"], n_blocks=2, task="binary", embed_dim=model.embed_dim, avgpool=True)
    glori = GloriHead(["A", "B"], n_blocks=2, embed_dim=model.embed_dim, decoder_dim=16, num_heads=2, ffn_dim=32)
    assert "--n-blocks 1 --avgpool" in hf_classifier_problem(four)
    assert "no transformers class" in hf_classifier_problem(glori)
    with pytest.raises(ConfigError, match="not exported to transformers"):
        export_hf(model, tmp_path / "x", head=four)
    other = LinearHead(["A"], n_blocks=1, task="binary", embed_dim=model.embed_dim, avgpool=True)
    other.info = type("I", (), {"backbone_sha256": "0" * 64, "source": "h.safetensors"})()
    with pytest.raises(ConfigError, match="trained on backbone 000000000000"):
        export_hf(model, tmp_path / "y", head=other)


def test_preprocessor_does_the_geometry_and_normalisation(tmp_path, small_png):
    from PIL import Image

    from chexfound.data.transform import InputTransform
    from chexfound.io import read_image

    model, _ = _random_backbone(tmp_path, "tiny_vit")
    export_hf(model, tmp_path / "hf", verify=False)
    proc = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    pixels = read_image(small_png).pixels
    img8 = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
    got = proc(images=img8, return_tensors="pt")["pixel_values"][0]
    tf = InputTransform(size=64, minmax_rescale=False)  # the processor has no per-image min-max (the card says so)
    ref = tf(np.asarray(img8, dtype=np.float32) / 255)
    assert got.shape == ref.shape == (3, 64, 64)
    # PIL's 8-bit bicubic against ours in float: within a few grey levels (/ std 0.225 -> ~0.1)
    assert float((got - ref).abs().mean()) < 0.02 and float((got - ref).abs().max()) < 0.2


def test_cli_export_hf(tmp_path):
    model, path = _random_backbone(tmp_path, "tiny_vit")
    out = tmp_path / "cli-hf"
    assert main(["export", "--format", "hf", "--backbone", str(path), "--out", str(out)]) == 0
    hf = _load(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state[:, 0], _ours(model, x)[0], rtol=0, atol=1e-4)
    # chexfound reads its own export back (Hugging Face Dinov2 layout)
    back = create_backbone(out)
    torch.testing.assert_close(_ours(back, x)[1], _ours(model, x)[1], rtol=0, atol=1e-5)


def _lora_model(base, seed: int = 3):
    """base with LoRA r=4 on qkv/proj and random, non-zero A and B (as after training)."""
    import copy

    m = copy.deepcopy(base)
    apply_lora(m, r=4, alpha=8.0, dropout=0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_a.copy_(torch.randn(mod.lora_a.shape, generator=g) * 0.3)
                mod.lora_b.copy_(torch.randn(mod.lora_b.shape, generator=g) * 0.3)
    return m.eval()


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_vit_mlp"])
def test_lora_adapter_round_trips_through_peft(tmp_path, name):
    base, _ = _random_backbone(tmp_path, name)
    lora = _lora_model(base)
    adapter = adapter_from_model(lora, "lora", backbone_sha256(base))
    save_adapter(adapter, tmp_path / "a.safetensors")
    adapter = load_adapter(tmp_path / "a.safetensors")
    export_hf(base, tmp_path / "hf")
    res = export_peft_adapter(adapter, base, tmp_path / "hf-lora", base_hf_dir=str(tmp_path / "hf"))
    assert res["verified"] and max(res["max_abs_diff"].values()) <= 1e-4
    config = json.loads((tmp_path / "hf-lora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0

    pm = peft.PeftModel.from_pretrained(_load(tmp_path / "hf"), str(tmp_path / "hf-lora")).eval()
    adapted = sorted(n for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    depth = base.cfg.depth
    assert len(adapted) == 4 * depth and all(n.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj", "o_proj")
                                             for n in adapted)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = pm(pixel_values=x).last_hidden_state
    cls, patches = _ours(lora, x)
    r = base.cfg.num_register_tokens
    torch.testing.assert_close(hidden[:, 0], cls, rtol=0, atol=1e-4)
    torch.testing.assert_close(hidden[:, 1 + r:], patches, rtol=0, atol=1e-4)
    # and the adapter really changes the model (the comparison above could not pass on the base alone)
    assert float((hidden[:, 0] - _ours(base, x)[0]).abs().max()) > 1e-2


def test_cli_export_hf_with_adapter(tmp_path):
    base, path = _random_backbone(tmp_path, "tiny_vit")
    lora = _lora_model(base)
    save_adapter(adapter_from_model(lora, "lora", backbone_sha256(base)), tmp_path / "a.safetensors")
    out = tmp_path / "exp"
    assert main(["export", "--format", "hf", "--backbone", str(path), "--adapter", str(tmp_path / "a.safetensors"),
                 "--out", str(out)]) == 0
    assert (tmp_path / "exp-lora" / "adapter_model.safetensors").is_file()
    pm = peft.PeftModel.from_pretrained(_load(out), str(tmp_path / "exp-lora")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(pm(pixel_values=x).last_hidden_state[:, 0], _ours(lora, x)[0], rtol=0, atol=1e-4)
    # merged instead: one transformers model equal to base + adapter
    assert main(["export", "--format", "hf", "--backbone", str(path), "--adapter", str(tmp_path / "a.safetensors"),
                 "--merge-adapter", "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        h = _load(tmp_path / "merged")(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(h, _ours(lora, x)[0], rtol=0, atol=1e-4)
    # another base is refused, naming the adapter
    _, other = _random_backbone(tmp_path, "tiny_vit", seed=5)
    assert main(["export", "--format", "hf", "--backbone", str(other), "--adapter", str(tmp_path / "a.safetensors"),
                 "--out", str(tmp_path / "no")]) != 0
    assert not (tmp_path / "no").exists()


def test_lora_fine_tune_on_real_images_to_peft(tmp_path, data_root):
    """The user's path: `adapt --finetune lora` on real NIH images, then `export --format hf --adapter`; peft on the
    export gives our base + adapter's features for a real image."""
    import pandas as pd

    from chexfound.adapt.adapter import apply_adapter
    from chexfound.io import read_image

    df = pd.read_csv(data_root / "nih14" / "labels.csv").head(8)
    df["path"] = [str(data_root / "nih14" / p) for p in df["path"]]
    df["split"] = ["train"] * 6 + ["val"] * 2
    df.to_csv(tmp_path / "m.csv", index=False)
    base, path = _random_backbone(tmp_path, "tiny_vit")
    run = tmp_path / "run"
    assert main(["adapt", "--backbone", str(path), "--train", str(tmp_path / "m.csv"), "--labels", "Effusion",
                 "--task", "binary", "--head", "linear", "--finetune", "lora", "--epochs", "1", "--lrs", "1e-2",
                 "--batch-size", "3", "--out", str(run), "--quiet"]) == 0
    adapter_file = run / "linear.adapter.safetensors"
    assert main(["export", "--format", "hf", "--backbone", str(path), "--adapter", str(adapter_file),
                 "--out", str(tmp_path / "hf")]) == 0
    pm = peft.PeftModel.from_pretrained(_load(tmp_path / "hf"), str(tmp_path / "hf-lora")).eval()
    tuned = apply_adapter(base, load_adapter(adapter_file))
    x = tuned.info.transform(read_image(df["path"].iloc[0]).pixels)[None]
    with torch.no_grad():
        hidden = pm(pixel_values=x).last_hidden_state
    cls, patches = _ours(tuned, x)
    torch.testing.assert_close(hidden[:, 0], cls, rtol=0, atol=1e-4)
    torch.testing.assert_close(hidden[:, 3:], patches, rtol=0, atol=1e-4)
    assert float((cls - _ours(base, x)[0]).abs().max()) > 1e-5  # training moved the features


def test_cli_export_hf_refuses_what_peft_cannot_hold(tmp_path, capsys):
    base, path = _random_backbone(tmp_path, "tiny_vit")
    bitfit = adapter_from_model(base, "bitfit", backbone_sha256(base))
    save_adapter(bitfit, tmp_path / "b.safetensors")
    args = ["export", "--format", "hf", "--backbone", str(path), "--out", str(tmp_path / "o")]
    assert main([*args, "--adapter", str(tmp_path / "b.safetensors")]) == 2
    assert "peft has no bitfit adapter format: add --merge-adapter" in capsys.readouterr().err
    save_head(LinearHead(["A"], 1, "binary", embed_dim=64, avgpool=True), tmp_path / "h.safetensors")
    assert main([*args, "--adapter", str(tmp_path / "b.safetensors"), "--head", str(tmp_path / "h.safetensors")]) == 2
    assert "add --merge-adapter" in capsys.readouterr().err
    assert main([*args, "--adapter-out", str(tmp_path / "x")]) == 2
    assert "need --adapter" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()
    assert main(["export", "--format", "onnx", "--backbone", str(path), "--head", str(tmp_path / "h.safetensors"),
                 "--merge-adapter", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "for --format hf" in capsys.readouterr().err
