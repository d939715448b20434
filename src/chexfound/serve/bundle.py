"""A backbone + head pair: loading one (files, names or modules), checking they belong together, running them
as one module (`Classifier`), and keeping them in one safetensors file (the bundle `chexfound export
--format safetensors` writes and `--model` reads).

A head is trained on one backbone's features; on another backbone its outputs mean nothing. Heads record the
weights hash of their backbone, and `load_pair` refuses a different one unless the caller explicitly allows it
(`allow_backbone_mismatch=True`, `--allow-backbone-mismatch`): then it warns, and says so in the model info.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from chexfound.adapt.attribution import (
    CLS_ATTENTION,
    LINEAR_CONTRIBUTION,
    LastBlockInput,
    heatmap_kind,
    patch_contributions,
)
from chexfound.adapt.forward import head_forward
from chexfound.adapt.heads.base import Head
from chexfound.adapt.heads.loading import HeadInfo, head_info, load_head
from chexfound.data.transform import InputTransform
from chexfound.errors import CheckpointError, ConfigError
from chexfound.models.create import create_backbone
from chexfound.models.info import ModelInfo, attach_info, info_of
from chexfound.models.vit import VisionTransformer

BUNDLE_KIND = "classifier"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Classifier(nn.Module):
    """Backbone + head as one module: normalised images [B, 3, S, S] -> (probabilities [B, C],
    heatmaps [B, C, S/p, S/p] or None).

    The heatmaps are of the kind `heatmap_kind` names (`chexfound.adapt.attribution`): a GLoRI head's
    attention averaged over attention heads, a linear avgpool head's exact per-patch logit shares, or else the
    last block's CLS attention (one map repeated for every finding). The same module is what `chexfound
    export` writes to ONNX, so served and exported outputs agree.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.heatmap_kind = heatmap_kind(head)
        self._last_block = LastBlockInput(backbone) if self.heatmap_kind == CLS_ATTENTION else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Normalised images -> (probabilities [B, C], attention maps [B, C, g, g] or None)."""
        feats, logits, attention = head_forward(self.backbone, self.head, x)
        probs = self.head.probabilities(logits.float())
        p = self.backbone.patch_size
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        if attention is not None:
            maps = attention.float().mean(dim=1)  # [B, heads, C, N] -> [B, C, N]
        elif self.heatmap_kind == LINEAR_CONTRIBUTION:
            maps = patch_contributions(self.head, feats[-1][0])
        else:
            cls = self._last_block.cls_attention() if self._last_block is not None else None
            if cls is None:
                return probs, None
            maps = cls[:, None].expand(-1, probs.shape[1], -1)
        # Patches are row-major like the backbone's.
        return probs, maps.reshape(maps.shape[0], maps.shape[1], gh, gw)


def check_pairing(trained_on: str | None, backbone_sha: str | None, head_path: Any,
                  allow_mismatch: bool = False) -> str | None:
    """None when the head was trained on this backbone (or either hash is unknown). Otherwise a
    CheckpointError, or, with `allow_mismatch`, a warning whose message is returned."""
    if not trained_on or not backbone_sha or trained_on == backbone_sha:
        return None
    msg = (f"head was trained on backbone {trained_on[:12]}..., but the given backbone is {backbone_sha[:12]}...; "
           "its outputs are not meaningful on this backbone")
    if not allow_mismatch:
        raise CheckpointError(head_path, msg + " (to run it anyway, pass --allow-backbone-mismatch / "
                                               "allow_backbone_mismatch=True)")
    warnings.warn(f"{head_path}: {msg}", stacklevel=3)
    return msg


@dataclass
class ModelPair:
    """A loaded backbone and head that belong together (or were explicitly allowed not to)."""

    backbone: VisionTransformer
    head: Head
    backbone_info: ModelInfo
    head_info: HeadInfo
    transform: InputTransform
    pairing_warning: str | None = None


def _transform(backbone: ModelInfo, head: HeadInfo) -> InputTransform:
    """The head's recorded transform (what its features were computed with), else the backbone's."""
    if head.transform:
        tf = InputTransform.from_dict(head.transform)
        if tf != backbone.transform:
            import logging

            logging.getLogger(__name__).warning(
                "head and backbone record different input transforms; using the head's (%s)", head.transform)
        return tf
    return backbone.transform


def load_pair(backbone: str | PathLike[str] | nn.Module, head: str | PathLike[str] | nn.Module, *,
              allow_backbone_mismatch: bool = False, transform: InputTransform | None = None) -> ModelPair:
    """Backbone (file, named architecture or module) + head (file or module) -> ModelPair. The file kinds are
    read from their bytes (`create_backbone`, `load_head`); a head from another backbone is refused unless
    `allow_backbone_mismatch`."""
    bb = backbone if isinstance(backbone, nn.Module) else create_backbone(backbone)
    hd = head if isinstance(head, nn.Module) else load_head(head)
    b_info, h_info = info_of(bb), head_info(hd)  # type: ignore[arg-type]
    head_path = h_info.source or (None if isinstance(head, nn.Module) else str(head)) or "head"
    warning = check_pairing(h_info.backbone_sha256, b_info.weights_sha256, head_path, allow_backbone_mismatch)
    n_blocks = int(getattr(hd, "n_blocks", 1))
    if n_blocks > len(bb.blocks):  # type: ignore[arg-type]
        raise CheckpointError(h_info.source, f"head reads the last {n_blocks} blocks but the backbone has only "
                                             f"{len(bb.blocks)}")  # type: ignore[arg-type]
    tf = transform or _transform(b_info, h_info)
    if tf.size % bb.patch_size:  # type: ignore[operator]
        raise ConfigError(None, f"input size {tf.size} is not a multiple of patch {bb.patch_size}")
    return ModelPair(bb, hd, b_info, h_info, tf, warning)  # type: ignore[arg-type]


# -- one file ------------------------------------------------------------------------------------------------
def save_bundle(pair: ModelPair, path: str | PathLike[str], dtype: str = "fp32") -> str:
    """Backbone + head weights and both identities in one safetensors file; returns its SHA-256."""
    from chexfound.models.format import save_tensors

    if dtype not in _DTYPES:
        raise ConfigError(None, f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    tensors: dict[str, Tensor] = {}
    for prefix, module in (("backbone.", pair.backbone), ("head.", pair.head)):
        for k, v in module.state_dict().items():
            # Buffers such as thresholds stay fp32: only floating weights are cast.
            keep = not v.is_floating_point() or k == "thresholds"
            tensors[prefix + k] = v if keep else v.to(_DTYPES[dtype])
    head, bi = pair.head, pair.backbone_info
    meta = {
        "kind": BUNDLE_KIND,
        "weights_dtype": dtype,
        "backbone": {
            "config": pair.backbone.cfg.to_dict(),
            "weights_sha256": bi.weights_sha256,
            "name": bi.name,
            "origin": bi.file_extra(),
        },
        "head": {
            **pair.head_info.meta,
            "kind": "head",
            "head_type": head.head_type,
            "task": head.task,
            "findings": list(head.findings),
            "thresholds": [float(t) if torch.isfinite(t) else None for t in head.thresholds],
            "n_blocks": head.n_blocks,
            "config": head.hparams(),
            "backbone_sha256": pair.head_info.backbone_sha256 or bi.weights_sha256,
        },
        "transform": pair.transform.to_dict(),
    }
    return save_tensors(path, tensors, meta)


def load_bundle(path: str | PathLike[str]) -> tuple[VisionTransformer, Head, dict[str, Any]]:
    """-> (backbone with `info`, head with `info`, metadata) from a `save_bundle` file (weights back in fp32)."""
    from chexfound.adapt.heads.base import head_from_meta
    from chexfound.models.config import ViTConfig
    from chexfound.models.format import load_tensors

    tensors, meta = load_tensors(path)
    if meta.get("kind") != BUNDLE_KIND:
        raise CheckpointError(path, f"expected a classifier bundle (from `chexfound export --format safetensors`), "
                                    f"found kind={meta.get('kind')!r}")
    try:
        cfg = ViTConfig.from_dict(meta["backbone"]["config"])
        head = head_from_meta(meta["head"])
    except CheckpointError as e:
        raise CheckpointError(path, e.reason) from e
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid bundle metadata ({e})") from e
    backbone = VisionTransformer(cfg)
    for prefix, module in (("backbone.", backbone), ("head.", head)):
        sd = {k[len(prefix):]: v.float() if v.is_floating_point() else v
              for k, v in tensors.items() if k.startswith(prefix)}
        try:
            missing, unexpected = module.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shapes that disagree with the recorded config / findings
            raise CheckpointError(path, f"{prefix.rstrip('.')} tensors do not match the bundle metadata "
                                        f"({' '.join(str(e).split())[:300]})") from e
        if missing or unexpected:
            raise CheckpointError(path, f"{prefix.rstrip('.')} keys do not match: missing {missing}, "
                                        f"unexpected {unexpected}")
    b = meta["backbone"]
    attach_info(backbone, ModelInfo(
        name=b.get("name") or cfg.name or Path(path).stem, config=cfg,
        transform=InputTransform.from_dict(meta["transform"]),
        # The identity of the weights exported (fp16/bf16 bundles hold a rounded copy of them).
        weights_sha256=b.get("weights_sha256") or "", source=str(path), format="chexfound_bundle",
        config_source="bundle metadata", origin=dict(b.get("origin") or {})))
    head.info = HeadInfo.from_meta(meta["head"], str(path))
    return backbone.eval(), head.eval(), meta
