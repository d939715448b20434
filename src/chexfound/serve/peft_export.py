"""A LoRA adapter (`chexfound.adapt.adapter`) in peft's format, for the base `export_hf` wrote.

`export_peft_adapter(adapter, base, out, base_hf_dir)` writes adapter_config.json + adapter_model.safetensors
(+ a short README.md) that `peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base_hf_dir), out)`
applies with our outputs: our fused-qkv LoRA is exactly three LoRAs (query, key, value) sharing one A matrix,
with B split in three row blocks (the q, k, v rows of the fused projection); proj -> the attention output
projection. Module names are those transformers 5 gives the model in memory (`attention.q_proj` ...), which
is what peft matches; `chexfound.models.to_hf.TRANSFORMERS_TESTED` is the range the tests cover.
"""

from __future__ import annotations

import tempfile
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from chexfound import __version__
from chexfound.adapt.adapter import Adapter, check_adapter_base
from chexfound.errors import CheckpointError, ConfigError
from chexfound.models.to_hf import hf_lora_module
from chexfound.serve.hf_export import check_max_diff, install_folder, write_json

__all__ = ["export_peft_adapter", "peft_adapter_config", "peft_adapter_tensors", "verify_peft"]


def peft_adapter_tensors(adapter: Adapter, depth: int) -> dict[str, Tensor]:
    """Our LoRA tensors under peft's names for the transformers-5 model: qkv's A shared by q/k/v, its B split
    in three row blocks (query, key, value rows of the fused projection); proj -> o_proj."""
    if adapter.method != "lora":
        raise ConfigError(adapter.source, f"peft's LoRA format holds LoRA adapters; this one is {adapter.method} "
                                          "(export the merged backbone instead: --merge-adapter)")
    out: dict[str, Tensor] = {}
    for name, (a, b) in adapter.lora_pairs().items():
        parts = name.split(".")  # blocks.<i>.attn.<qkv|proj>
        if len(parts) != 4 or parts[0] != "blocks" or parts[2] != "attn" or not 0 <= int(parts[1]) < depth:
            raise CheckpointError(adapter.source, f"LoRA on {name}: peft export covers blocks.<i>.attn.qkv/proj")
        targets = hf_lora_module(int(parts[1]), parts[3])
        bs = b.chunk(len(targets), dim=0)
        for t, bb in zip(targets, bs):
            out[f"base_model.model.{t}.lora_A.weight"] = a.float().contiguous().clone()
            out[f"base_model.model.{t}.lora_B.weight"] = bb.float().contiguous().clone()
    return out


def peft_adapter_config(adapter: Adapter, tensors: dict[str, Tensor], base_path: str | None = None) -> dict[str, Any]:
    """adapter_config.json: LoRA with our r, alpha and dropout on the modules `tensors`
    (`peft_adapter_tensors`) adapt."""
    mods = sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k})
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_path,
        "r": int(adapter.lora["r"]),
        "lora_alpha": float(adapter.lora["alpha"]),
        "lora_dropout": float(adapter.lora.get("dropout", 0.0)),
        "target_modules": mods,  # full names: exactly the adapted modules
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def export_peft_adapter(adapter: Adapter, base: nn.Module, out: str | PathLike[str], base_hf_dir: str | None = None,
                        verify: bool = True, atol: float = 1e-4) -> dict[str, Any]:
    """Write `adapter` (LoRA, trained on `base`) as a peft adapter folder for `export_hf(base)`'s folder;
    checked with peft + transformers when installed (outputs equal ours with the adapter, fp32)."""
    out_dir = Path(out)
    info = check_adapter_base(base, adapter)
    tensors = peft_adapter_tensors(adapter, base.cfg.depth)
    config = peft_adapter_config(adapter, tensors, base_hf_dir)
    result: dict[str, Any] = {"path": str(out_dir), "modules": len(config["target_modules"]),
                              "base_sha256": adapter.base_sha256}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as t:
        tmp = Path(t)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", config)
        if verify and base_hf_dir and _peft_available():
            diffs = verify_peft(base_hf_dir, tmp, base, adapter)
            check_max_diff(diffs, atol, out_dir)
            result["max_abs_diff"] = diffs
        result["verified"] = "max_abs_diff" in result
        (tmp / "README.md").write_text(
            f"# LoRA adapter (peft) for {info.name or 'a chexfound backbone'}\n\n"
            f"r {config['r']}, alpha {config['lora_alpha']:g}, on the attention query/key/value and output "
            f"projections of {base.cfg.depth} blocks ({sum(v.numel() for v in tensors.values()) / 1e6:.2f} M "
            f"parameters). Base weights SHA-256: `{adapter.base_sha256}`; written by chexfound {__version__} from "
            f"`{adapter.source}`.\n\n```python\nfrom transformers import AutoModel\nfrom peft import PeftModel\n\n"
            f"base = AutoModel.from_pretrained(\"{base_hf_dir or 'BASE_EXPORT'}\")\n"
            "model = PeftModel.from_pretrained(base, \"THIS_FOLDER\").eval()\n```\n\n"
            "Research use only, not for clinical use (see the base export's model card).\n")
        install_folder(tmp, out_dir, "adapter_config.json")
    return result


def _peft_available() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def verify_peft(base_hf_dir: str | PathLike[str], adapter_dir: str | PathLike[str], base: nn.Module,
                adapter: Adapter, seed: int = 0) -> dict[str, float]:
    """peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base_hf_dir), adapter_dir) against our base with
    the adapter (LoRA wrappers, not merged) on one random image at the native resolution."""
    import peft
    import transformers

    from chexfound.adapt.adapter import apply_adapter

    hf = transformers.AutoModel.from_pretrained(str(base_hf_dir)).float().eval()
    pm = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    ours = apply_adapter(base, adapter, merge=False).eval()
    cfg = base.cfg
    x = torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        h = pm(pixel_values=x).last_hidden_state
        o = ours.forward_features(x)
    r = cfg.num_register_tokens
    return {"cls": float((h[:, 0] - o["x_norm_clstoken"]).abs().max()),
            "patch_tokens": float((h[:, 1 + r:] - o["x_norm_patchtokens"]).abs().max())}
