"""`chexfound convert IN --out OUT.safetensors`: any supported backbone checkpoint -> our format."""

from __future__ import annotations

import argparse
from pathlib import Path

from chexfound.errors import ChexfoundError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a CheXFound/DINOv2/Hugging Face backbone checkpoint to chexfound safetensors",
        description="Load a backbone checkpoint strictly (official CheXFound teacher_checkpoint.pth [+config.yaml], "
                    "DINOv2 .pth, Hugging Face Dinov2 folder/model.safetensors, or chexfound safetensors) and write it "
                    "as chexfound safetensors with its config, input transform and any SSL/classifier heads. "
                    "The output's SHA-256 is printed and written to OUT.sha256.",
    )
    p.add_argument("input", help="checkpoint file or folder")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--config", default=None,
                   help="architecture: a named config, a config.yaml (DINOv2/CheXFound) or config.json (HF); "
                        "default: stored with the weights, else inferred from the tensors")
    p.add_argument("--head-dim", type=int, default=64, help="attention head width when inferring (default 64)")
    p.add_argument("--no-heads", action="store_true", help="drop SSL/classifier heads instead of keeping them")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from chexfound.models import load_backbone, save_backbone
    from chexfound.models.format import sha256_file
    from chexfound.runio import atomic_write_bytes

    src = Path(args.input)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ChexfoundError(f"{out}: --out must end with .safetensors")
    model, meta = load_backbone(src, args.config, head_dim=args.head_dim)
    heads = {} if args.no_heads else meta["heads"]
    src_file = Path(meta["source"])
    source = {
        "path": str(src_file),
        "format": meta["format"],
        "sha256": sha256_file(src_file),
        "config_source": meta["config_source"],
        "ignored": meta["ignored"],
        "warnings": meta["warnings"],
    }
    sha = save_backbone(model, out, transform=meta["transform"], extra={"source": source}, heads=heads)
    atomic_write_bytes(out.with_name(out.name + ".sha256"), f"{sha}  {out.name}\n".encode())
    if not args.quiet:
        cfg = model.cfg
        n_params = sum(p.numel() for p in model.parameters())
        print(f"read    {src_file} ({meta['format']}; config: {meta['config_source']})")
        print(f"model   ViT patch {cfg.patch_size}, dim {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, "
              f"{cfg.num_register_tokens} registers, {cfg.ffn_layer}, {cfg.img_size} px, {n_params / 1e6:.1f} M params")
        for name, sd in heads.items():
            print(f"head    {name}: {len(sd)} tensors, {sum(t.numel() for t in sd.values()) / 1e6:.1f} M params")
        if args.no_heads and meta["heads"]:
            print(f"dropped heads (--no-heads): {', '.join(meta['heads'])}")
        for w in meta["warnings"]:
            print(f"warning {w}")
        for item in meta["ignored"]:
            print(f"ignored {item}")
        print(f"wrote   {out}")
    print(f"sha256  {sha}")
    return 0
