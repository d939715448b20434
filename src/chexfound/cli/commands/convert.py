"""`chexfound convert IN --out OUT.safetensors`: any supported backbone checkpoint -> our format."""

from __future__ import annotations

import argparse
from pathlib import Path

from chexfound.cli.options import add_arch_options
from chexfound.errors import ChexfoundError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a CheXFound/DINOv2/Hugging Face backbone checkpoint to chexfound safetensors",
        description="Load a backbone checkpoint strictly (official CheXFound teacher_checkpoint.pth [+config.yaml], "
                    "one of our pretraining runs' teacher_checkpoint.pth, DINOv2 .pth, Hugging Face Dinov2 "
                    "folder/model.safetensors, or chexfound safetensors; the kind is read from the bytes, not the "
                    "name) and write it as chexfound safetensors with its name, config, input transform and any "
                    "SSL/classifier heads. The architecture comes from the file or the config beside it; when "
                    "neither records it, --arch, --num-heads or --head-dim must say it (nothing is guessed). "
                    "Two hashes are printed, named: weights_sha256 (the model's identity: what `info`, `predict`, "
                    "`serve` and heads trained on it show) and file_sha256 (the bytes of OUT, also written to "
                    "OUT.sha256 for `sha256sum -c`).",
    )
    p.add_argument("input", help="checkpoint file or folder, or a Hugging Face Hub id (hf://OWNER/NAME[@REVISION]"
                                 "[/FILE], chexfound-vitl16)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    add_arch_options(p, old_spelling="--config")
    p.add_argument("--no-heads", action="store_true", help="drop SSL/classifier heads instead of keeping them")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from chexfound.models import create_backbone, save_backbone
    from chexfound.models.format import read_meta, sha256_file
    from chexfound.models.info import format_params
    from chexfound.runio import atomic_write_bytes

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ChexfoundError(f"{out}: --out must end with .safetensors")
    model = create_backbone(args.input, config=args.arch, num_heads=args.num_heads, head_dim=args.head_dim)
    info = model.info
    heads = {} if args.no_heads else info.heads
    src_file = Path(info.source)
    source = {
        "path": str(src_file),
        "format": info.format,
        "sha256": sha256_file(src_file),
        "config_source": info.config_source,
        "ignored": info.ignored,
        "warnings": info.warnings,
        **({"hub": info.origin["hub"]} if "hub" in info.origin else {}),
    }
    file_sha = save_backbone(model, out, transform=info.transform.to_dict(), extra={"source": source}, heads=heads)
    atomic_write_bytes(out.with_name(out.name + ".sha256"), f"{file_sha}  {out.name}\n".encode())
    if not args.quiet:
        cfg = model.cfg
        print(f"read    {src_file} ({info.format}; config: {info.config_source})")
        print(f"model   {info.name}: ViT patch {cfg.patch_size}, dim {cfg.embed_dim}, depth {cfg.depth}, heads "
              f"{cfg.num_heads}, {cfg.num_register_tokens} registers, {cfg.ffn_layer}, {cfg.img_size} px, "
              f"{format_params(info.num_params)} params")
        for name, sd in heads.items():
            print(f"head    {name}: {len(sd)} tensors, {sum(t.numel() for t in sd.values()) / 1e6:.1f} M params")
        if args.no_heads and info.heads:
            print(f"dropped heads (--no-heads): {', '.join(info.heads)}")
        for note in info.notes:
            print(f"note    {note}")
        for w in info.warnings:
            print(f"warning {w}")
        for item in info.ignored:
            print(f"ignored {item}")
        print(f"wrote   {out}")
    # The weights hash is the identity every other command shows; the file hash only checks the bytes.
    print(f"weights_sha256  {read_meta(out)['weights_sha256']}")
    print(f"file_sha256     {file_sha}  (also in {out.name}.sha256)")
    return 0
