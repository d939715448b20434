"""`chexfound export`: a backbone + head as ONNX (checked against PyTorch) or one safetensors bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from chexfound.cli.commands.predict import add_model_args, load_predictor
from chexfound.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export backbone + head to ONNX (dynamic batch) or a safetensors bundle",
        description="ONNX: input `image` [batch, 3, S, S] normalised as the recorded transform says (in the "
                    "file's metadata), outputs `probabilities` and, for attention heads, `attention`. "
                    "The export is checked against PyTorch with onnxruntime unless --no-verify.")
    add_model_args(p, compile_option=False)  # an exported graph is traced from the eager model
    p.add_argument("--format", choices=["onnx", "safetensors"], required=True)
    p.add_argument("--out", required=True, help="output file (.onnx or .safetensors)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--no-attention", action="store_true", help="ONNX: probabilities only")
    p.add_argument("--no-verify", action="store_true", help="ONNX: skip the onnxruntime check")
    p.add_argument("--weights-dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="safetensors: store weights in this precision")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from chexfound.serve.export import DEFAULT_OPSET, export_onnx, export_safetensors

    out = Path(args.out)
    predictor = load_predictor(argparse.Namespace(**{**vars(args), "device": "cpu", "dtype": "fp32"}))
    if args.format == "onnx":
        if out.suffix != ".onnx":
            raise ConfigError(out, "ONNX output should end in .onnx")
        result = export_onnx(predictor, out, opset=args.opset or DEFAULT_OPSET, attention=not args.no_attention,
                             verify=not args.no_verify)
        print(json.dumps(result))
    else:
        if args.opset is not None:
            raise ConfigError(None, "--opset is for --format onnx")
        sha = export_safetensors(predictor, out, dtype=args.weights_dtype)
        print(json.dumps({"path": str(out), "sha256": sha, "weights_dtype": args.weights_dtype}))
    return 0
