"""The official CheXFound weights as the Hugging Face Hub publishes them (`DIAL-RPI/CheXFound`): one
`model.safetensors` and a small `config.json` beside it.

The tensors are the teacher backbone's `state_dict` of the original `vit_large` (block_chunks=0), each key
prefixed `model.`, with LayerScale named `ls1.weight` / `ls2.weight` (the rename transformers' save_pretrained
applies to any parameter called gamma). Without that prefix and rename it is the release's own key scheme, so
the official filter (`official.filter_chexfound_official`) maps it from there; nothing is mapped twice.

Strict like every loader here: every key must be `model.<name>`, every block must hold the same tensors with the
same shapes, and errors name the tensor as the file spells it. The `config.json` has no schema we know: only a
top-level head count (`num_heads` / `num_attention_heads`) or a DINOv2 `arch` name is read from it, unknown keys
never fail, and the tensors win over it.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from torch import Tensor

from chexfound.errors import CheckpointError
from chexfound.models.loaders.keys import Filtered
from chexfound.models.loaders.official import DINOV2_ARCHS, filter_chexfound_official

FORMAT = "chexfound_hub"
FORMAT_NAME = "CheXFound (Hugging Face Hub layout)"
PREFIX = "model."
_LS_FILE = re.compile(r"^(blocks\.\d+\.ls[12])\.weight$")
_LS_OURS = re.compile(r"^(blocks\.\d+\.ls[12])\.gamma$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def looks_chexfound_hub(keys: list[str]) -> bool:
    """The Hub layout's mark: the patch embedding under `model.` (a stray key without it is still reported)."""
    return PREFIX + "patch_embed.proj.weight" in keys


def file_key(name: str) -> str:
    """Our tensor name -> the Hub file's (for messages): `blocks.3.ls1.gamma` -> `model.blocks.3.ls1.weight`."""
    return PREFIX + _LS_OURS.sub(r"\1.weight", name)


def filter_chexfound_hub(sd: dict[str, Tensor], path: Path) -> Filtered:
    """`model.<name>` -> `<name>`, `ls{1,2}.weight` -> `ls{1,2}.gamma`, then the release's own mapping."""
    stray = sorted(k for k in sd if not k.startswith(PREFIX))
    if stray:
        raise CheckpointError(path, f"tensor {stray[0]!r} is not under {PREFIX!r}: in the CheXFound Hugging Face Hub "
                                    f"layout every tensor is {PREFIX}<name>"
                                    + (f" ({len(stray) - 1} more such tensors)" if len(stray) > 1 else ""))
    renamed = {_LS_FILE.sub(r"\1.gamma", k[len(PREFIX):]): v for k, v in sd.items()}
    out = filter_chexfound_official(renamed, path)
    check_blocks_alike(out.backbone, path)
    out.notes.append(f"{FORMAT_NAME}: {PREFIX} prefix removed, LayerScale ls1/ls2.weight read as gamma")
    out.file_key = file_key
    return out


def check_blocks_alike(sd: dict[str, Tensor], path: Path) -> None:
    """Every block of a DINOv2 ViT holds the same tensors with the same shapes: a block that differs is named
    (before the architecture is read from block 0, which would otherwise describe a different model)."""
    blocks: dict[int, dict[str, tuple[int, ...]]] = {}
    for k, v in sd.items():
        m = _BLOCK.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = tuple(v.shape)
    if len(blocks) < 2:
        return
    n = len(blocks)
    where: Counter[str] = Counter(leaf for b in blocks.values() for leaf in b)
    for leaf, count in sorted(where.items()):
        if count == n:
            shapes = Counter(b[leaf] for b in blocks.values())
            if len(shapes) > 1:
                usual = shapes.most_common(1)[0][0]
                odd = sorted(i for i, b in blocks.items() if b[leaf] != usual)
                raise CheckpointError(path, f"tensor {file_key(f'blocks.{odd[0]}.{leaf}')} has shape "
                                            f"{list(blocks[odd[0]][leaf])}, but {n - len(odd)} of the {n} blocks have "
                                            f"{list(usual)}")
        elif count > n / 2:
            gone = sorted(i for i, b in blocks.items() if leaf not in b)
            raise CheckpointError(path, f"tensor {file_key(f'blocks.{gone[0]}.{leaf}')} is missing ({count} of the "
                                        f"{n} blocks have {leaf})")
        else:
            extra = sorted(i for i, b in blocks.items() if leaf in b)
            raise CheckpointError(path, f"unexpected tensor {file_key(f'blocks.{extra[0]}.{leaf}')} (only {count} of "
                                        f"the {n} blocks have {leaf})")


def config_json_heads(weights: Path, dim: int, depth: int) -> tuple[int, str] | None:
    """A head count the `config.json` beside the weights says unambiguously, or None. Read: a top-level integer
    `num_heads` / `num_attention_heads` that splits `dim`, or a DINOv2 `arch` name (`vit_large`, ...) whose width
    and depth are these tensors'. Anything else in the file is left alone, whatever it is."""
    import json

    cj = weights.parent / "config.json"
    try:
        d: Any = json.loads(cj.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict):
        return None
    for key in ("num_heads", "num_attention_heads"):
        v = d.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0 and dim % v == 0:
            return v, f"{v} heads from {cj.name} ({key})"
    arch = d.get("arch")
    if isinstance(arch, str) and arch.removesuffix("_memeff") in DINOV2_ARCHS:
        a_dim, a_depth, heads = DINOV2_ARCHS[arch.removesuffix("_memeff")]
        if (a_dim, a_depth) == (dim, depth):
            return heads, f"{heads} heads of {arch} from {cj.name} (arch)"
    return None
