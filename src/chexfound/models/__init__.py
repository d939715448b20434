"""Backbones: the DINOv2/CheXFound ViT, named configs, our file format and foreign-checkpoint loaders."""

from chexfound.models.config import ViTConfig
from chexfound.models.registry import create_backbone, get_config, list_configs
from chexfound.models.vit import VisionTransformer

__all__ = ["ViTConfig", "VisionTransformer", "create_backbone", "get_config", "list_configs"]
