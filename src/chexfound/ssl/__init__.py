"""Self-supervised pretraining: multi-crop, masking, DINO/iBOT/KoLeo losses, heads, meta-architecture, loop.

Entry points: `chexfound.ssl.config.load_config(preset, overrides)` and `chexfound.ssl.train.pretrain(cfg, out)`
(the `chexfound pretrain` CLI). See docs/pretraining.md.
"""
