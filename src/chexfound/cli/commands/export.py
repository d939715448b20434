"""`chexfound export`: a backbone + head as ONNX (checked against PyTorch) or one safetensors bundle, each with
its model card beside it (`--results` adds measured numbers to it); a backbone (+ a linear head, + a LoRA adapter
for peft) as a Hugging Face transformers folder with its README.md card."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from chexfound.cli.commands.predict import add_model_args, load_predictor
from chexfound.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export backbone + head to ONNX (dynamic batch), a safetensors bundle or transformers",
        description="ONNX: input `image` [batch, 3, S, S] normalised as the recorded transform says (in the "
                    "file's metadata), outputs `probabilities` and, for attention heads, `attention`. "
                    "The export is checked against PyTorch with onnxruntime unless --no-verify. "
                    "hf: a folder `transformers.AutoModel.from_pretrained` loads with no custom code "
                    "(Dinov2WithRegistersModel / Dinov2Model; with a linear head on [CLS, mean patch token]: "
                    "*ForImageClassification), with its model card; checked against chexfound with transformers "
                    "unless --no-verify. With --adapter (LoRA) also a peft adapter folder for it (--adapter-out).")
    add_model_args(p, compile_option=False)  # an exported graph is traced from the eager model
    p.add_argument("--format", choices=["onnx", "safetensors", "hf"], required=True)
    p.add_argument("--out", required=True, help="output file (.onnx or .safetensors) or folder (hf)")
    p.add_argument("--adapter-out", metavar="DIR",
                   help="hf with a LoRA --adapter: the peft adapter folder (default: OUT-lora beside OUT)")
    p.add_argument("--merge-adapter", action="store_true",
                   help="hf: export base + --adapter merged into one model instead of base + peft adapter")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--no-attention", action="store_true", help="ONNX: probabilities only")
    p.add_argument("--no-verify", action="store_true", help="ONNX: skip the onnxruntime check")
    p.add_argument("--results", action="append", default=[], metavar="JSON",
                   help="measured results for the model card (repeatable): evaluate's metrics.json, adapt's "
                        "<head>.metrics.json or pretraining's probe_comparison.json; results measured on another "
                        "backbone are refused")
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
    if args.format == "hf":
        return _run_hf(args, out)
    if args.adapter_out or args.merge_adapter:
        raise ConfigError(None, "--adapter-out and --merge-adapter are for --format hf (onnx and safetensors "
                                "always merge --adapter)")
    if args.precision != "fp32":
        raise ConfigError(None, "export writes fp32 weights: use --quantize int8 (ONNX) or --weights-dtype "
                                "(safetensors) instead of --precision")
    if (args.quantize or args.calibrate) and args.format != "onnx":
        raise ConfigError(None, "--quantize and --calibrate are for --format onnx")
    if args.calibrate and args.quantize_mode != "static":
        raise ConfigError(None, "--calibrate needs --quantize-mode static")
    predictor = load_predictor(argparse.Namespace(**{**vars(args), "device": "cpu", "precision": "fp32"}))
    results = _results(args.results, predictor.backbone_sha256)
    if args.format == "onnx":
        if out.suffix != ".onnx":
            raise ConfigError(out, "ONNX output should end in .onnx")
        calibration = None
        if args.calibrate:
            from chexfound.serve.inputs import collect_inputs

            calibration = [str(p) for p in collect_inputs(args.calibrate, None)]
        result = export_onnx(predictor, out, opset=args.opset or DEFAULT_OPSET, attention=not args.no_attention,
                             verify=not args.no_verify, quantize=args.quantize, quantize_mode=args.quantize_mode,
                             calibration=calibration, results=results)
        print(json.dumps(result))
    else:
        if args.opset is not None:
            raise ConfigError(None, "--opset is for --format onnx")
        sha = export_safetensors(predictor, out, dtype=args.weights_dtype, results=results)
        print(json.dumps({"path": str(out), "sha256": sha, "weights_dtype": args.weights_dtype,
                          "card": str(out.with_suffix(".md"))}))
    return 0


def _run_hf(args: argparse.Namespace, out: Path) -> int:
    from chexfound.adapt import load_head
    from chexfound.adapt.adapter import apply_adapter, check_adapter_base, load_adapter
    from chexfound.models import create_backbone
    from chexfound.serve.hf_export import export_hf
    from chexfound.serve.peft_export import export_peft_adapter

    if args.model:
        raise ConfigError(None, "--format hf exports --backbone (and --head, --adapter), not a --model bundle")
    if not args.backbone:
        raise ConfigError(None, "--format hf needs --backbone")
    if args.opset is not None or args.no_attention or args.weights_dtype != "fp32" or args.precision != "fp32":
        raise ConfigError(None, "--opset, --no-attention, --weights-dtype and --precision are not for --format hf "
                                "(it writes and checks float32 weights)")
    base = create_backbone(args.backbone, config=args.arch, num_heads=args.num_heads, head_dim=args.head_dim)
    adapter = load_adapter(args.adapter) if args.adapter else None
    if adapter is not None and args.head and not args.merge_adapter:
        raise ConfigError(None, "a head trained with an adapter belongs to the merged backbone: add "
                                "--merge-adapter to export both as one transformers classifier")
    if adapter is not None and adapter.method != "lora" and not args.merge_adapter:
        raise ConfigError(args.adapter, f"peft has no {adapter.method} adapter format: add --merge-adapter to "
                                        "export base + adapter merged")
    if (args.merge_adapter or args.adapter_out) and adapter is None:
        raise ConfigError(None, "--merge-adapter and --adapter-out need --adapter")
    if args.merge_adapter and args.adapter_out:
        raise ConfigError(None, "--adapter-out names the peft folder; with --merge-adapter there is none")
    if adapter is not None:
        check_adapter_base(base, adapter)  # before anything is written
    model = apply_adapter(base, adapter) if adapter is not None and args.merge_adapter else base
    head = load_head(args.head) if args.head else None
    result = export_hf(model, out, head=head, verify=not args.no_verify,
                       allow_backbone_mismatch=args.allow_backbone_mismatch and not args.strict)
    if adapter is not None and not args.merge_adapter:
        adapter_dir = Path(args.adapter_out) if args.adapter_out else out.with_name(out.name + "-lora")
        result["adapter"] = export_peft_adapter(adapter, base, adapter_dir, base_hf_dir=str(out),
                                                verify=not args.no_verify)
    print(json.dumps(result))
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
