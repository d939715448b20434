"""Reading a deployment bundle (`chexfound export --format safetensors`): one file, backbone + head.

The writer is `chexfound.serve.export.export_safetensors`; the reader lives apart from it because
`Predictor.from_bundle` needs it, and the exporter needs the Predictor (one module for both was an import
circle).
"""

from __future__ import annotations

from os import PathLike
from typing import Any

from torch import nn

from chexfound.errors import CheckpointError
from chexfound.models.format import load_tensors


def load_bundle(path: str | PathLike[str]) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """-> (backbone, head, metadata) from an `export_safetensors` file (weights back in fp32)."""
    from chexfound.adapt.heads.base import head_from_meta
    from chexfound.models import ViTConfig, VisionTransformer

    tensors, meta = load_tensors(path)
    if meta.get("kind") != "classifier":
        raise CheckpointError(path, f"expected a classifier bundle, found kind={meta.get('kind')!r}")
    backbone = VisionTransformer(ViTConfig.from_dict(meta["backbone"]["config"]))
    try:
        head = head_from_meta(meta["head"])
    except CheckpointError as e:
        raise CheckpointError(path, e.reason) from e
    for prefix, module in (("backbone.", backbone), ("head.", head)):
        sd = {k[len(prefix):]: v.float() if v.is_floating_point() else v
              for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(path, f"{prefix.rstrip('.')} keys do not match: missing {missing}, "
                                        f"unexpected {unexpected}")
    return backbone.eval(), head.eval(), meta
