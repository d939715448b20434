"""Backbones: the DINOv2/CheXFound ViT, named configs, our file format and foreign-checkpoint loaders.

`create_backbone(name_or_path, checkpoint=None, ...)` is the one entry: every model it returns carries
`model.info` (`ModelInfo`: name, config, input transform, weights SHA-256, source and provenance).
"""

from chexfound.models.config import ViTConfig
from chexfound.models.create import create_backbone
from chexfound.models.info import ModelInfo, info_of
from chexfound.models.registry import derive_config, get_config, list_configs
from chexfound.models.vit import VisionTransformer
from chexfound.models.ours import backbone_sha256, load_ours, save_backbone
from chexfound.models.loaders import SUPPORTED, load_backbone, resolve_config

__all__ = [
    "SUPPORTED",
    "ModelInfo",
    "ViTConfig",
    "VisionTransformer",
    "backbone_sha256",
    "create_backbone",
    "derive_config",
    "get_config",
    "info_of",
    "list_configs",
    "load_backbone",
    "load_ours",
    "resolve_config",
    "save_backbone",
]
