"""Say what an unsupported state dict is, so the error tells the user what they handed us."""

from __future__ import annotations

from collections.abc import Iterable

SUPPORTED = (
    "supported backbone files: the official CheXFound weights as the Hugging Face Hub publishes them "
    "(model.safetensors, model.-prefixed keys), the CheXFound teacher_checkpoint.pth (+ config.yaml; chunked or flat "
    "blocks, teacher./backbone./module. prefixes), original DINOv2 .pth state dicts, Hugging Face "
    "Dinov2Model / Dinov2WithRegistersModel (model.safetensors or pytorch_model.bin + config.json), and "
    "chexfound .safetensors backbones"
)

ARCHITECTURES = (
    "loadable architectures: DINOv2-style ViTs (square conv patch embedding, CLS token, optional register "
    "tokens, learned square position embedding with a CLS entry, pre-norm blocks with fused qkv, optional "
    "LayerScale, GELU MLP or packed SwiGLU, final LayerNorm)"
)


def describe_state_dict(keys: Iterable[str]) -> str:
    ks = list(keys)
    s = set(ks)

    def has(*subs: str) -> bool:
        return any(all(sub in k for sub in subs) for k in ks)

    if has("classifiers_dict") or has("duplicate_pooling") or has("query_embed"):
        return "a CheXFound classifier head checkpoint (glori.pth / linear heads), not a backbone"
    if {"state", "param_groups"} <= s:
        return "an optimizer state dict, not model weights"
    if "reg_token" in s or ("cls_token" in s and has("blocks.0.mlp.fc1") and "mask_token" not in s and has("norm_pre")):
        return "a timm VisionTransformer state dict (timm names such as reg_token; no CLS position)"
    if has("conv_proj.weight") or has("encoder.layers.encoder_layer_"):
        return "a torchvision VisionTransformer state dict"
    if has("vision_model.embeddings"):
        return "a Hugging Face CLIP/SigLIP-style vision tower"
    if has("vit.embeddings") or has("encoder.layer.0.attention.attention.query") and not has("layer_scale1"):
        return "a Hugging Face ViT (no LayerScale), not a DINOv2"
    if has("word_embeddings"):
        return "a text model (word embeddings)"
    if has("layer1.0.conv1") or has("features.conv0") or has("features.denseblock"):
        return "a convolutional network (ResNet/DenseNet) state dict"
    if has("patch_embed.proj.weight") and not has("blocks."):
        return "a patch embedding without transformer blocks"
    if has("patch_embed.proj.weight") and has("blocks.", "attn.qkv"):
        return "a ViT backbone checkpoint (DINOv2/CheXFound key layout)"
    sample = ", ".join(sorted(ks)[:6])
    return f"an unrecognised state dict with {len(ks)} tensors (e.g. {sample})"
