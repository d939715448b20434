"""Backbones: the DINOv2/CheXFound ViT, named configs, our file format and foreign-checkpoint loaders."""

from chexfound.models.config import ViTConfig
from chexfound.models.registry import create_backbone, get_config, list_configs
from chexfound.models.vit import VisionTransformer

__all__ = ["ViTConfig", "VisionTransformer", "create_backbone", "get_config", "list_configs"]

from chexfound.models.ours import backbone_sha256, load_ours, save_backbone  # noqa: E402


def load_backbone(path, config=None):  # replaced by the multi-format loader of the backbone issue
    """Load a backbone file -> (model in eval mode, metadata)."""
    return load_ours(path)


__all__ += ["backbone_sha256", "load_backbone", "save_backbone"]
