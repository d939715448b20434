"""The official CheXFound release: `teacher_checkpoint.pth` (+ `config.yaml`), and original DINOv2 `.pth`.

Both are DINOv2 state dicts, so they share one key scheme (`patch_embed.proj`, `blocks.<i>.attn.qkv`,
`ls1.gamma`, `mlp.w12`/`mlp.fc1`, `norm`, ...). The CheXFound teacher adds:
- a `{"teacher": ...}` wrapper and `backbone.` / `dino_head.` / `ibot_head.` prefixes,
- FSDP block chunks `blocks.<chunk>.<i>.` when trained with `block_chunks > 0` (the released 512 run),
- the SSL heads, which we keep (never dropped) for continued pretraining.
The release's `config.yaml` is a DINOv2 SSL config (OmegaConf YAML): `student.*` holds the architecture,
`crops.global_crops_size` the size the position embedding was built for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from chexfound.errors import ConfigError
from chexfound.models.config import IMAGENET_MEAN, IMAGENET_STD, ViTConfig
from chexfound.models.loaders.keys import SSL_HEADS, Filtered, split_heads, strip_prefixes, unchunk_blocks
from chexfound.runio import read_run_config

# DINOv2 `vision_transformer.vit_*` builders: (embed_dim, depth, num_heads); all use mlp_ratio 4.
DINOV2_ARCHS = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16), "vit_giant2": (1536, 40, 24)}
# ssl_default_config.yaml values for anything a config file leaves out.
_STUDENT_DEFAULTS: dict[str, Any] = {
    "arch": "vit_large", "patch_size": 16, "drop_path_rate": 0.3, "layerscale": 1.0e-5, "drop_path_uniform": True,
    "ffn_layer": "mlp", "block_chunks": 0, "qkv_bias": True, "proj_bias": True, "ffn_bias": True,
    "num_register_tokens": 0, "interpolate_antialias": False, "interpolate_offset": 0.1,
}


def _filter_dinov2_style(sd: dict[str, Tensor], path: Path) -> Filtered:
    rest, heads = split_heads({strip_prefixes(k, ("teacher.",)) : v for k, v in sd.items()}, SSL_HEADS)
    backbone = {strip_prefixes(k, ("backbone.",)): v for k, v in rest.items()}
    backbone, chunks = unchunk_blocks(backbone, path)
    out = Filtered(backbone=backbone, heads=heads)
    if chunks:
        out.notes.append(f"block-chunked keys (blocks.<chunk>.<i>., {chunks} chunks) mapped to flat blocks.<i>.")
    return out


def filter_chexfound_official(sd: dict[str, Tensor], path: Path) -> Filtered:
    """CheXFound `teacher_checkpoint.pth` (already unwrapped from {"teacher": ...}): strip `backbone.`,
    un-chunk `blocks.<chunk>.<i>.`, keep `dino_head.*` / `ibot_head.*` as heads. Flat keys work too."""
    return _filter_dinov2_style(sd, path)


def filter_dinov2(sd: dict[str, Tensor], path: Path) -> Filtered:
    """Original DINOv2 `.pth` (hub `dinov2_vit*14[_reg4]_pretrain.pth`): flat backbone keys, no prefixes.
    Training-side DINOv2 checkpoints carry the same prefixes/heads as CheXFound's and are handled alike."""
    return _filter_dinov2_style(sd, path)


def looks_official(raw_keys: list[str], wrapper: list[str]) -> bool:
    """The release's marks: a teacher wrapper, `backbone.` prefixes, SSL heads or chunked blocks."""
    if "teacher" in wrapper or "teacher." in wrapper:
        return True
    return any(k.startswith(("backbone.", "dino_head.", "ibot_head.")) for k in raw_keys) or any(
        k.startswith("blocks.") and k.split(".")[2].isdigit() for k in raw_keys if k.count(".") >= 3
    )


def is_dinov2_ssl_config(d: Any) -> bool:
    return isinstance(d, dict) and isinstance(d.get("student"), dict)


def config_from_dinov2_yaml(d: dict[str, Any], source: str | Path) -> ViTConfig:
    """Architecture from a DINOv2/CheXFound SSL config (the release's `config.yaml`)."""
    student = {**_STUDENT_DEFAULTS, **(d.get("student") or {})}
    arch = str(student["arch"]).removesuffix("_memeff")
    if arch not in DINOV2_ARCHS:
        raise ConfigError(source, f"student.arch {arch!r} is not a DINOv2 ViT (known: {', '.join(DINOV2_ARCHS)})")
    dim, depth, heads = DINOV2_ARCHS[arch]
    ffn = str(student["ffn_layer"])
    if ffn in ("swiglu", "swiglufused"):
        ffn = "swiglu"
    elif ffn != "mlp":
        raise ConfigError(source, f"student.ffn_layer {ffn!r} is not supported (mlp, swiglu, swiglufused)")
    crops = d.get("crops") or {}
    img_size = int(crops.get("global_crops_size", 224))
    layerscale = student["layerscale"]
    return ViTConfig(
        img_size=img_size, patch_size=int(student["patch_size"]), embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=4.0, num_register_tokens=int(student["num_register_tokens"]), ffn_layer=ffn,  # type: ignore[arg-type]
        layerscale_init=float(layerscale) if layerscale else None, qkv_bias=bool(student["qkv_bias"]),
        proj_bias=bool(student["proj_bias"]), ffn_bias=bool(student["ffn_bias"]),
        drop_path_rate=float(student["drop_path_rate"]), drop_path_uniform=bool(student["drop_path_uniform"]),
        interpolate_offset=float(student["interpolate_offset"]),
        interpolate_antialias=bool(student["interpolate_antialias"]),
        # The CheXFound eval transform: ImageNet mean/std after a per-image min-max rescale.
        mean=IMAGENET_MEAN, std=IMAGENET_STD, minmax_rescale=True,
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping (`chexfound.runio.read_run_config`); an empty file is an error here."""
    d = read_run_config(path)
    if not d:
        raise ConfigError(path, "expected a YAML mapping, the file is empty")
    return d


def find_release_config(ckpt: Path) -> Path | None:
    """The `config.yaml` beside a `teacher_checkpoint.pth`: the release's (a DINOv2 SSL config) or, in one of
    our pretraining run folders, the run's own (`chexfound.models.loaders.run_config`)."""
    from chexfound.models.loaders.run_config import is_run_config

    cand = ckpt.parent / "config.yaml"
    if cand.is_file():
        try:
            d = read_yaml(cand)
        except ConfigError:
            return None
        if is_run_config(d) or is_dinov2_ssl_config(d):
            return cand
    return None


def config_from_ssl_yaml(d: dict[str, Any], source: str | Path) -> ViTConfig:
    """Either SSL config layout -> the backbone's architecture (ours is recognised first: its `student.arch`
    is a registry name, which no DINOv2 config uses)."""
    from chexfound.models.loaders.run_config import config_from_run, is_run_config

    if is_run_config(d):
        return config_from_run(d, source)
    return config_from_dinov2_yaml(d, source)
