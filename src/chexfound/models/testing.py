"""Tiny backbone configs for tests and smoke runs, kept out of the production registry.

Importing this module registers them (`tiny_vit`, `tiny_vit_mlp`) in this process; `enable()` also names it in
CHEXFOUND_MODEL_MODULES, so the processes this one starts (CLI subprocesses, torchrun workers, a served model)
register them too. The test suite calls it in its conftest, and every bench's `--smoke` mode does (through
bench/_timing.py), so a smoke run works from a plain source tree. They are too small to learn anything useful,
which is why `chexfound.models.list_configs()` does not offer them to users.
"""

from __future__ import annotations

import os

from chexfound.models.config import ViTConfig
from chexfound.models.registry import MODULES_ENV, register

TEST_CONFIGS = ("tiny_vit", "tiny_vit_mlp")


def enable() -> None:
    """Make the tiny configs known here (importing this module did) and in every process started from here."""
    names = [m for m in os.environ.get(MODULES_ENV, "").split(",") if m.strip()]
    if __name__ not in names:
        os.environ[MODULES_ENV] = ",".join([*names, __name__])


@register("tiny_vit")
def _tiny() -> ViTConfig:
    """2 blocks, 64 px, patch 16, dim 64, 2 heads, 2 registers, SwiGLU."""
    return ViTConfig(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_register_tokens=2,
                     ffn_layer="swiglu", layerscale_init=1e-5)


@register("tiny_vit_mlp")
def _tiny_mlp() -> ViTConfig:
    """4 blocks, 64 px, patch 16, dim 64, 4 heads, no registers, GELU MLP, no LayerScale."""
    return ViTConfig(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, num_register_tokens=0,
                     ffn_layer="mlp", layerscale_init=None)
