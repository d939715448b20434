"""Export a backbone + head for deployment: ONNX (runs without PyTorch) or one safetensors bundle.

ONNX: input `image` float32 [batch, 3, S, S], already normalised by the recorded input transform;
outputs `probabilities` [batch, C] and, for heads with attention, `attention` [batch, C, S/p, S/p]
(mean over attention heads) — the same as `Classifier`, which `Predictor` runs. The model's metadata_props
carry `chexfound` = JSON with findings, thresholds (and the rule behind each), task, input transform and
backbone identity, so a deployment can preprocess and threshold without this package.

Calibration: a head's post-hoc calibrator is part of the graph (`Head.probabilities` applies it), so
`probabilities` are the calibrated ones the thresholds were chosen on. The metadata also carries it
(`calibration`: per finding the method and its parameters, `calibration_applied_in_graph`: true) and the
informative verdicts (`informative`); a finding with `informative: false`, or with a null threshold, gets no
call.

safetensors bundle: tensors `backbone.*` and `head.*` with kind='classifier' metadata holding both
files' metadata (`chexfound.serve.bundle`); `Predictor.from_bundle` reads it back.

Every export writes its model card beside it (`model.onnx` -> `model.md`; `chexfound.models.card`).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import warnings
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from chexfound.errors import CheckpointError
from chexfound.models.card import ModelFile, ResultTable, head_facts, write_card
from chexfound.models.format import sha256_file
from chexfound.serve.bundle import Classifier, ModelPair, load_bundle, save_bundle
from chexfound.serve.predictor import Predictor

__all__ = ["DEFAULT_OPSET", "export_metadata", "export_onnx", "export_safetensors", "load_bundle", "onnx_session",
           "read_onnx_metadata", "verify_onnx"]

DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17; onnxruntime >= 1.14 runs it
ONNX_META_KEY = "chexfound"


class _OnnxClassifier(nn.Module):
    """`Classifier` with tensor-only outputs (ONNX has no None)."""

    def __init__(self, model: Classifier, with_attention: bool) -> None:
        super().__init__()
        self.model, self.with_attention = model, with_attention

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        probs, maps = self.model(x)
        return (probs, maps) if self.with_attention and maps is not None else (probs,)


def export_metadata(predictor: Predictor) -> dict[str, Any]:
    info = predictor.info()
    return {
        "findings": predictor.findings,
        "thresholds": [float(t) if np.isfinite(t) else None for t in predictor.thresholds],  # None: no call
        # per finding, the rule that chose its threshold and the evidence (a deployment shows them too)
        "threshold_rules": predictor.threshold_rules,
        "task": predictor.task,
        "head_type": predictor.head_type,
        "transform": predictor.transform.to_dict(),
        "backbone_sha256": predictor.backbone_sha256,
        "backbone_name": info["backbone"]["name"],
        "backbone_provenance": info["backbone"]["provenance"],
        "backbone_config": predictor.model.backbone.cfg.to_dict(),
        "head_file_sha256": info["head"]["file_sha256"],
        "has_attention": predictor.has_attention,
        # what predict and serve draw for this head; the ONNX `attention` output is there for GLoRI heads only
        "heatmap_kind": predictor.heatmap_kind,
        "calibration": calibration_parameters(predictor),
        "calibration_applied_in_graph": predictor.head.calibration is not None,
        "informative": info["informative"],
        "input": "image: float32 [batch, 3, S, S], normalised by `transform`",
        "outputs": ["probabilities"] + (["attention"] if predictor.has_attention else []),
    }


def calibration_parameters(predictor: Predictor) -> list[dict[str, Any]] | None:
    """Per finding the calibrator the graph applies: {"method", "scale", "bias"} (p = sigmoid(scale z + bias) on
    the logit z; multiclass: softmax(scale z)) or {"method": "isotonic", "knots_x", "knots_y"} (p = piecewise-
    linear interpolation of sigmoid(z) through the knots). None when the head has no calibrator."""
    cal = getattr(predictor.head, "calibration", None)
    if cal is None:
        return None
    methods = list((getattr(predictor.head, "calibration_info", None) or {}).get("methods") or [])
    out = []
    for i in range(len(predictor.findings)):
        m = methods[i] if i < len(methods) else None
        if bool(cal.isotonic[i] > 0.5):
            xs, ys = cal.knots_x[i].tolist(), cal.knots_y[i].tolist()
            out.append({"method": m or "isotonic", "knots_x": xs, "knots_y": ys})
        else:
            out.append({"method": m, "scale": float(cal.scale[i]), "bias": float(cal.bias[i])})
    return out


def export_onnx(
    predictor: Predictor,
    path: str | PathLike[str],
    opset: int = DEFAULT_OPSET,
    attention: bool = True,
    verify: bool = True,
    atol: float | None = None,
    results: Sequence[ResultTable] = (),
    quantize: str | None = None,
    quantize_mode: str = "dynamic",
    calibration: list[str] | None = None,
) -> dict[str, Any]:
    """Write `path` (.onnx) and its model card (`<stem>.md`, with `results` where the caller has measured ones);
    returns {"path", "opset", "outputs", "precision", "max_abs_diff" (when verified), "card"}.
    `quantize="int8"`: int8 MatMuls through onnxruntime's quantization (`chexfound.serve.onnx_quant`;
    `quantize_mode` "dynamic", or "static" calibrated on the `calibration` images). The check against PyTorch
    then uses the int8 tolerance, 0.05 on probabilities and attention (fp32: 1e-4)."""
    import onnx

    out = Path(path)
    size = predictor.transform.size
    model = predictor.model if predictor.device.type == "cpu" else copy.deepcopy(predictor.model).cpu()
    with_attention = attention and predictor.has_attention
    wrapper = _OnnxClassifier(model.float().eval(), with_attention).eval()
    names = ["probabilities"] + (["attention"] if with_attention else [])
    example = torch.zeros(2, 3, size, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_file = Path(tmp) / out.name
        with warnings.catch_warnings(), torch.no_grad():
            # The legacy exporter traces one fixed input size; these warnings are about that, and expected.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                wrapper, (example,), str(tmp_file), dynamo=False, opset_version=opset,
                input_names=["image"], output_names=names,
                dynamic_axes={n: {0: "batch"} for n in ["image", *names]},
                do_constant_folding=True,
            )
        meta = export_metadata(predictor)
        meta["outputs"] = names
        meta["precision"] = "fp32"
        if quantize is not None:
            from chexfound.serve.onnx_quant import quantize_onnx

            if quantize != "int8":
                raise CheckpointError(out, f"--quantize {quantize!r}: only int8 is supported")
            qdir = Path(tmp) / "q"
            qdir.mkdir()
            meta.update(quantize_onnx(tmp_file, qdir / out.name, quantize_mode, calibration or [],
                                      prepare=predictor.preprocess))
            for f in list(Path(tmp).iterdir()):  # the fp32 model is replaced by the int8 one
                if f.is_file():
                    f.unlink()
            for f in qdir.iterdir():
                shutil.move(str(f), Path(tmp) / f.name)
            qdir.rmdir()
        proto = onnx.load(str(tmp_file), load_external_data=False)
        proto.metadata_props.add(key=ONNX_META_KEY, value=json.dumps(meta))
        proto.producer_name = "chexfound"
        onnx.save(proto, str(tmp_file))
        onnx.checker.check_model(str(tmp_file))
        result: dict[str, Any] = {"path": str(out), "opset": opset, "outputs": names, "precision": meta["precision"]}
        if atol is None:
            atol = 1e-4 if quantize is None else 5e-2
        if verify:  # before the file is put in place: a failed export leaves nothing behind
            real = None
            if calibration:  # static int8 is calibrated for real images: check it on them, not on noise
                from chexfound.serve.onnx_quant import calibration_batches

                real = next(calibration_batches(calibration[:3], predictor.preprocess, batch=3))
            result["max_abs_diff"] = _verify_dynamic(tmp_file, predictor, atol, out, real)
        # Large models come with external data files: move those first, the .onnx last (its arrival = done).
        extra_files = []
        for f in Path(tmp).iterdir():
            if f.name != out.name:
                shutil.move(str(f), out.parent / f.name)
                extra_files.append(f.name)
        tmp_file.replace(out)
    result["card"] = str(_card(predictor, ModelFile(out, "onnx", sha256_file(out), tuple(sorted(extra_files))),
                               results))
    return result


def _card(predictor: Predictor, file: ModelFile, results: Sequence[ResultTable]) -> Path:
    """The model card of an exported backbone + head (`chexfound.models.card`)."""
    meta = {**predictor.head_info.meta, "head_type": predictor.head_type, "task": predictor.task,
            "findings": list(predictor.findings), "thresholds": [float(t) for t in predictor.thresholds],
            "threshold_rules": predictor.threshold_rules or []}
    n_params = sum(p.numel() for p in predictor.model.head.parameters())
    return write_card(file, predictor.backbone_info, head=head_facts(meta, n_params), results=results)


def _verify_dynamic(path: Path, predictor: Predictor, atol: float, name: Path,
                    images: np.ndarray | None = None) -> dict[str, float]:
    diffs: dict[str, float] = {}
    # Batch sizes other than the traced one (2): a shape baked in by tracing shows up here.
    for batch in (1, 3):
        try:
            x = None if images is None else torch.from_numpy(images[:batch])
            got = verify_onnx(path, predictor, batch=batch, x=x)
        except Exception as e:  # onnxruntime's errors have no common base class
            raise CheckpointError(name, f"the exported model fails at batch size {batch} in onnxruntime "
                                        f"(an op whose shape tracing fixed?): {e}") from e
        diffs = {k: max(v, diffs.get(k, 0.0)) for k, v in got.items()}
    worst = max(diffs.values())
    if not worst <= atol:
        raise CheckpointError(name, f"ONNX outputs differ from PyTorch by {worst:.3g} (tolerance {atol:g})")
    return diffs


def onnx_session(path: str | PathLike[str], threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def read_onnx_metadata(path: str | PathLike[str]) -> dict[str, Any]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for p in proto.metadata_props:
        if p.key == ONNX_META_KEY:
            return json.loads(p.value)
    raise CheckpointError(path, "ONNX file has no chexfound metadata (not exported by chexfound)")


def verify_onnx(path: str | PathLike[str], predictor: Predictor, batch: int = 3, seed: int = 0,
                x: Tensor | None = None) -> dict[str, float]:
    """Max |onnxruntime - PyTorch| per output on a random batch (a batch size other than the traced one,
    so the dynamic batch axis is exercised too), or on the given normalised images `x`."""
    size = predictor.transform.size
    if x is None:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    sess = onnx_session(path)
    got = sess.run(None, {"image": x.numpy()})
    probs, maps = predictor.predict_tensor(x)
    names = [o.name for o in sess.get_outputs()]
    ref = {"probabilities": probs, "attention": maps}
    return {n: float(np.abs(g - ref[n]).max()) for n, g in zip(names, got) if ref[n] is not None}


# -- safetensors bundle --
def export_safetensors(predictor: Predictor, path: str | PathLike[str], dtype: str = "fp32",
                       results: Sequence[ResultTable] = ()) -> str:
    """One file with backbone + head weights and both identities (`chexfound.serve.bundle`), and its model
    card beside it; returns its SHA-256. `Predictor.from_bundle` / `--model` read it back."""
    pair = ModelPair(predictor.model.backbone, predictor.model.head, predictor.backbone_info, predictor.head_info,
                     predictor.transform, predictor.pairing_warning)
    sha = save_bundle(pair, path, dtype=dtype)
    _card(predictor, ModelFile(Path(path), "classifier", sha), results)
    return sha

