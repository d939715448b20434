"""Heads over `get_intermediate_layers(x, n, return_class_token=True)` features."""

from chexfound.adapt.heads.base import Features, Head, head_from_meta, load_our_head, output_dim, save_head
from chexfound.adapt.heads.glori import GloriHead
from chexfound.adapt.heads.linear import LinearHead
from chexfound.adapt.heads.mlp import MLPHead

HEAD_TYPES = {"glori": GloriHead, "linear": LinearHead, "mlp": MLPHead}

__all__ = ["Features", "GloriHead", "HEAD_TYPES", "Head", "LinearHead", "MLPHead", "head_from_meta",
           "load_our_head", "output_dim", "save_head"]
