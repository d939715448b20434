"""Adaptation on frozen, cached features: GLoRI, linear/MLP probes, other targets, grid training, heatmaps."""

from chexfound.adapt.heads.base import Head, load_our_head, save_head
from chexfound.adapt.heads.linear import LinearHead


def load_head(path):  # the adapt issue extends this to the released glori.pth layout
    """Load a head file -> Head module in eval mode (our format)."""
    return load_our_head(path)[0]


__all__ = ["Head", "LinearHead", "load_head", "save_head"]
