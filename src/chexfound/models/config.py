"""The architecture config of a ViT backbone: everything needed to rebuild it, and its input transform."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

# The input normalisation lives with the transform (data layer); imported here for the configs' defaults.
from chexfound.data.transform import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_register_tokens: int = 0
    ffn_layer: Literal["mlp", "swiglu"] = "mlp"
    layerscale_init: float | None = 1e-5
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    # Input transform the weights expect (recorded with every model).
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    minmax_rescale: bool = True
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side at `img_size`."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image at `img_size` (registers and CLS not counted)."""
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON values (what model files record)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
        """A config from `to_dict`'s output; unknown keys are refused (a file from a different program)."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViTConfig keys: {sorted(unknown)}")
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)
