"""Self-supervised pretraining: multi-crop, masking, DINO/iBOT/KoLeo losses, heads, meta-architecture, loop."""
