"""Heads over `get_intermediate_layers(x, n, return_class_token=True)` features."""

from chexfound.adapt.heads.base import (HEAD_TYPES, Features, Head, head_class, head_from_meta, load_our_head,
                                        output_dim, save_head)
from chexfound.adapt.heads.glori import GloriHead
from chexfound.adapt.heads.linear import LinearHead
from chexfound.adapt.heads.mlp import MLPHead

__all__ = ["Features", "GloriHead", "HEAD_TYPES", "Head", "LinearHead", "MLPHead", "head_class", "head_from_meta",
           "load_our_head", "output_dim", "save_head"]
