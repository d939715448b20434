"""`chexfound export`: a backbone + head as ONNX (checked against PyTorch) or one safetensors bundle, each with
its model card beside it (`--results` adds measured numbers to it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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
    p.add_argument("--results", action="append", default=[], metavar="JSON",
                   help="measured results for the model card (repeatable): evaluate's metrics.json, adapt's "
                        "<head>.metrics.json or pretraining's probe_comparison.json; results measured on another "
                        "backbone are refused")
    p.add_argument("--weights-dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="safetensors: store weights in this precision")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from chexfound.serve.export import DEFAULT_OPSET, export_onnx, export_safetensors

    out = Path(args.out)
    predictor = load_predictor(argparse.Namespace(**{**vars(args), "device": "cpu", "dtype": "fp32"}))
    results = _results(args.results, predictor.backbone_sha256)
    if args.format == "onnx":
        if out.suffix != ".onnx":
            raise ConfigError(out, "ONNX output should end in .onnx")
        result = export_onnx(predictor, out, opset=args.opset or DEFAULT_OPSET, attention=not args.no_attention,
                             verify=not args.no_verify, results=results)
        print(json.dumps(result))
    else:
        if args.opset is not None:
            raise ConfigError(None, "--opset is for --format onnx")
        sha = export_safetensors(predictor, out, dtype=args.weights_dtype, results=results)
        print(json.dumps({"path": str(out), "sha256": sha, "weights_dtype": args.weights_dtype,
                          "card": str(out.with_suffix(".md"))}))
    return 0


def _results(files: list[str], backbone_sha256: str) -> list[Any]:
    """The model card's result tables from the given files; numbers measured on another backbone are refused."""
    from chexfound.models.card_results import results_from_file

    tables: list[Any] = []
    for f in files:
        found, sha = results_from_file(f)
        if sha and sha != backbone_sha256:
            raise ConfigError(f, f"these results were measured on backbone {sha[:12]}..., not on the exported "
                                 f"backbone {backbone_sha256[:12]}...")
        tables += found
    return tables
