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
    p.add_argument("--quantize", choices=["int8"],
                   help="ONNX: int8 MatMuls via onnxruntime's quantization (metadata records precision and "
                        "calibration); checked against fp32 PyTorch within 0.05 on probabilities")
    p.add_argument("--quantize-mode", choices=["dynamic", "static"], default="dynamic",
                   help="--quantize: dynamic (activation scales at run time; default) or static QDQ calibrated "
                        "on --calibrate images")
    p.add_argument("--calibrate", nargs="+", metavar="IMAGES",
                   help="--quantize-mode static: real images (files or folders) whose activation ranges fix the "
                        "int8 scales")
    p.add_argument("--weights-dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="safetensors: store weights in this precision")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from chexfound.serve.export import DEFAULT_OPSET, export_onnx, export_safetensors

    out = Path(args.out)
    if args.precision != "fp32":
        raise ConfigError(None, "export writes fp32 weights: use --quantize int8 (ONNX) or --weights-dtype "
                                "(safetensors) instead of --precision")
    if (args.quantize or args.calibrate) and args.format != "onnx":
        raise ConfigError(None, "--quantize and --calibrate are for --format onnx")
    if args.calibrate and args.quantize_mode != "static":
        raise ConfigError(None, "--calibrate needs --quantize-mode static")
    predictor = load_predictor(argparse.Namespace(**{**vars(args), "device": "cpu", "precision": "fp32"}))
    if args.format == "onnx":
        if out.suffix != ".onnx":
            raise ConfigError(out, "ONNX output should end in .onnx")
        calibration = None
        if args.calibrate:
            from chexfound.serve.inputs import collect_inputs

            calibration = [str(p) for p in collect_inputs(args.calibrate, None)]
        result = export_onnx(predictor, out, opset=args.opset or DEFAULT_OPSET, attention=not args.no_attention,
                             verify=not args.no_verify, quantize=args.quantize, quantize_mode=args.quantize_mode,
                             calibration=calibration)
        print(json.dumps(result))
    else:
        if args.opset is not None:
            raise ConfigError(None, "--opset is for --format onnx")
        sha = export_safetensors(predictor, out, dtype=args.weights_dtype)
        print(json.dumps({"path": str(out), "sha256": sha, "weights_dtype": args.weights_dtype}))
    return 0
