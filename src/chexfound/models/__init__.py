"""Backbones: the DINOv2/CheXFound ViT, named configs, our file format and foreign-checkpoint loaders."""

from chexfound.models.config import ViTConfig
from chexfound.models.registry import create_backbone, get_config, list_configs
from chexfound.models.vit import VisionTransformer
from chexfound.models.ours import backbone_sha256, load_ours, save_backbone
from chexfound.models.loaders import SUPPORTED, load_backbone, resolve_config

__all__ = [
    "SUPPORTED",
    "ViTConfig",
    "VisionTransformer",
    "backbone_sha256",
    "create_backbone",
    "get_config",
    "list_configs",
    "load_backbone",
    "load_ours",
    "resolve_config",
    "save_backbone",
]
