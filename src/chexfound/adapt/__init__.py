"""Adaptation on frozen, cached features: GLoRI, linear/MLP probes, other targets, grid training, heatmaps.

    from chexfound.adapt import FeatureCache, GloriHead, fit_heads, load_head, predict
    train = FeatureCache.build(backbone, train_manifest, "cache/train", n_blocks=4)   # once; reruns reuse it
    val = FeatureCache.build(backbone, val_manifest, "cache/val", n_blocks=4)
    res = fit_heads(lambda: GloriHead(findings, 4, embed_dim=1024), train, y_train, val, y_val)  # 13-lr grid
    save_head(res.head, "glori.safetensors", backbone_sha256=train.backbone_sha256, transform=...)
    probs, attn = predict(load_head("glori.safetensors"), val, return_attention=True)

Modules: heads/ (GloriHead, LinearHead, MLPHead; tasks multilabel | binary | multiclass | regression |
survival), token_cache (FeatureCache: what the feature engine `chexfound.models.embedder` writes for heads),
sources (feature sources: token cache, pooled file, tensors, row subsets), fit (fit_heads + FitSettings),
grid (vmapped AdamW over stacked heads), losses (masked BCE, ASL, CE, MSE, Cox), selection (model selection
metrics), inference (predict), heatmap, released (original glori.pth), finetune (end to end: full, LoRA,
BitFit, when the cache is off; FinetuneSettings), pipeline (the `chexfound adapt` command as a function, with
options: AdaptOptions and validation, labels: splits and task label arrays, outputs: what a run writes).
"""

from __future__ import annotations

from chexfound.adapt.heads import GloriHead, Head, LinearHead, MLPHead, save_head
from chexfound.adapt.heads.loading import HeadInfo, head_info, load_head
from chexfound.adapt.released import load_released_head


def __getattr__(name: str):  # lazy: keep `import chexfound.adapt` light for the serve path
    if name == "FeatureCache":
        from chexfound.adapt.token_cache import FeatureCache

        return FeatureCache
    if name == "fit_heads":
        from chexfound.adapt.fit import fit_heads

        return fit_heads
    if name == "predict":
        from chexfound.adapt.inference import predict

        return predict
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FeatureCache", "GloriHead", "Head", "HeadInfo", "LinearHead", "MLPHead", "fit_heads", "head_info",
           "load_head",
           "load_released_head", "predict", "save_head"]
