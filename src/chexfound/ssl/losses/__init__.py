"""The three pretraining losses, one module each."""

from chexfound.ssl.losses.dino import dino_cls_loss, dino_cross_entropy
from chexfound.ssl.losses.ibot import ibot_patch_loss
from chexfound.ssl.losses.koleo import koleo_loss

__all__ = ["dino_cls_loss", "dino_cross_entropy", "ibot_patch_loss", "koleo_loss"]
