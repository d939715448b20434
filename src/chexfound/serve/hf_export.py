"""Export a backbone (and a linear head) as a Hugging Face transformers folder.

`export_hf(backbone, out)` writes what `transformers.AutoModel.from_pretrained(out)` loads with no custom
code: `Dinov2WithRegistersModel` (registers) or `Dinov2Model` (none), SwiGLU and LayerScale included:
    config.json                transformers' config (+ `chexfound`: identity, provenance, input transform)
    model.safetensors          tensors under transformers' file names (`chexfound.models.to_hf`)
    preprocessor_config.json   a `BitImageProcessor`: resize shorter side, centre crop, /255, mean/std
    README.md                  the model card (`hf_model_card`)
At the native resolution `last_hidden_state[:, 0]` is our final-norm CLS token and
`last_hidden_state[:, 1 + registers:]` our final-norm patch tokens; `export_hf` loads the folder back with
transformers (when installed) and checks that before the files are put in place.

A linear head (`adapt --head linear`) exports as `*ForImageClassification` when it computes what that class
computes: one linear layer on [CLS, mean patch token] of the last block (`--n-blocks 1 --avgpool`). Other
heads (GLoRI, MLP, linear on several blocks' CLS) have no transformers class; `hf_classifier_problem` says why.

A LoRA adapter for that folder, in peft's format: `chexfound.serve.peft_export`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from chexfound import __version__
from chexfound.adapt.forward import head_forward
from chexfound.adapt.heads import Head, LinearHead
from chexfound.data.transform import InputTransform
from chexfound.errors import CheckpointError, ConfigError
from chexfound.models.info import ModelInfo, info_of
from chexfound.models.to_hf import TRANSFORMERS_TESTED, hf_architecture, hf_base_prefix, hf_config, hf_state_dict

log = logging.getLogger(__name__)

__all__ = ["check_max_diff", "export_hf", "hf_classifier_problem", "hf_model_card", "hf_preprocessor_config",
           "install_folder", "verify_hf", "write_json"]


# -- what can be exported --
def hf_classifier_problem(head: Head) -> str | None:
    """None when transformers' Dinov2*ForImageClassification computes exactly this head, else why not."""
    if not isinstance(head, LinearHead):
        return (f"a {head.head_type or type(head).__name__} head has no transformers class (only a linear head on "
                f"[CLS, mean patch token] does: Dinov2*ForImageClassification)")
    if head.n_blocks != 1 or not head.avgpool:
        return (f"this linear head reads the CLS of the last {head.n_blocks} block(s)"
                f"{' and the mean patch token' if head.avgpool else ''}; transformers' "
                f"Dinov2*ForImageClassification reads [CLS, mean patch token] of the last block only "
                f"(train it with `adapt --head linear --n-blocks 1 --avgpool`)")
    if head.task not in ("multilabel", "binary", "multiclass"):
        return f"a {head.task} head's outputs are not classifier logits transformers can name"
    return None


def hf_preprocessor_config(transform: InputTransform) -> dict[str, Any]:
    """The part of our input transform a transformers `BitImageProcessor` expresses: resize the shorter side to
    `size` (bicubic) and centre-crop, scale 8-bit values to [0, 1], normalise with mean/std, grey -> RGB.
    Not expressed (said in the model card): the per-image min-max rescale, padding (`mode="pad"`), and
    16-bit / DICOM input (the processor takes 8-bit images)."""
    s = transform.size
    crop = transform.mode == "crop"
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": crop,
        "size": {"shortest_edge": s},
        "resample": 3,  # PIL bicubic; ours is torch's antialiased bicubic, equal to PIL's to float precision
        "do_center_crop": crop,
        "crop_size": {"height": s, "width": s},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(transform.mean),
        "image_std": list(transform.std),
        "do_convert_rgb": True,
    }


def _head_config(head: Head) -> dict[str, Any]:
    labels = list(head.findings)
    multi = head.task in ("multilabel", "binary")
    return {
        "architectures": None,  # filled by the caller
        "id2label": {str(i): n for i, n in enumerate(labels)},
        "label2id": {n: i for i, n in enumerate(labels)},
        # sigmoid per finding (multilabel, binary) or softmax over classes (multiclass)
        "problem_type": "multi_label_classification" if multi else "single_label_classification",
    }


# -- the model card --
def hf_model_card(info: ModelInfo, transform: InputTransform, hf_class: str, head: Head | None = None,
                  verified: dict[str, float] | None = None) -> str:
    """README.md for the exported folder: what the model is, where it came from (ModelInfo provenance and
    weights SHA-256), data and licences, intended use, the input transform (and what the image processor
    does not do), and how to load it. A small function on purpose: one model-card module may absorb it."""
    cfg = info.config
    r = cfg.num_register_tokens
    s = transform.size
    lines = [
        "---",
        "license: apache-2.0",
        "library_name: transformers",
        f"pipeline_tag: {'image-classification' if head is not None else 'image-feature-extraction'}",
        "tags: [chest-x-ray, radiology, medical-imaging, dinov2, chexfound]",
        "---",
        "",
        f"# {info.name or 'chexfound backbone'} ({hf_class})",
        "",
        f"A CheXFound-style chest X-ray vision transformer exported by chexfound {__version__}: ViT with "
        f"{cfg.depth} blocks of width {cfg.embed_dim}, {cfg.num_heads} heads, patch {cfg.patch_size}, "
        f"{r} register token(s), {'SwiGLU' if cfg.ffn_layer == 'swiglu' else 'GELU MLP'}"
        f"{', LayerScale' if cfg.layerscale_init else ''}; native input {s} x {s} px "
        f"({info.num_params / 1e6:.1f} M parameters).",
        "",
        "## Provenance",
        "",
        f"- Weights: {info.provenance()}",
        f"- Loaded from: `{info.source}` ({info.format})",
        f"- Weights SHA-256 (chexfound state-dict hash; heads and adapters record it): `{info.weights_sha256}`",
    ]
    if head is not None:
        rules = {d.get("finding"): d.get("rule", "") for d in (getattr(head, "threshold_rules", None) or [])}
        lines += ["", f"Classifier: a linear layer on [CLS, mean patch token], {head.task}, "
                      f"{len(head.findings)} output(s); decision thresholds on the probabilities "
                      "(also in config.json under `chexfound.thresholds`):", ""]
        lines += [f"- {f}: {float(t):.4g}" + (f" ({rules[f]})" if rules.get(f) else "")
                  for f, t in zip(head.findings, head.thresholds.tolist())]
    lines += [
        "",
        "## Data and licences",
        "",
        "- chexfound and the original CheXFound code and released weights (DIAL-RPI/CheXFound): Apache-2.0.",
        "- Weights pretrained or adapted on NIH ChestX-ray14: \"no restrictions on the use of the NIH chest x-ray "
        "images\"; attribution required: https://nihcc.app.box.com/v/ChestXray-NIHCC, Wang et al., "
        "\"ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks\", CVPR 2017; the NIH Clinical Center "
        "provided the data.",
        "- Weights pretrained or adapted on the Kermany paediatric set: Kermany et al., \"Identifying Medical "
        "Diagnoses and Treatable Diseases by Image-Based Deep Learning\", Cell 2018; data CC BY 4.0, Mendeley "
        "Data doi:10.17632/rscbjbr9sj.2.",
        "",
        "## Intended use",
        "",
        "Research on chest radiograph representations: feature extraction, probing, fine-tuning. **Not for "
        "clinical use**: not a medical device, not validated for diagnosis, triage or any decision about a "
        "patient.",
        "",
        "## Input",
        "",
        f"chexfound's transform (`InputTransform`): grayscale in [0, 1] -> resize the shorter side to {s} "
        f"(bicubic, antialiased) -> {'centre crop' if transform.mode == 'crop' else 'pad'} to {s} x {s}"
        f"{' -> per-image min-max to [0, 1]' if transform.minmax_rescale else ''} -> 3 channels -> "
        f"(x - mean) / std with mean {list(transform.mean)}, std {list(transform.std)}.",
        "",
        "`preprocessor_config.json` (a `BitImageProcessor`) does the resize"
        + (", centre crop" if transform.mode == "crop" else "") + ", scaling and mean/std. It does **not** do:",
        "",
    ]
    gaps = []
    if transform.minmax_rescale:
        gaps.append("the per-image min-max rescale: stretch each image to its full range first "
                    "(`(x - x.min()) / (x.max() - x.min())`), or use chexfound's transform")
    if transform.mode == "pad":
        gaps.append(f"padding to square: pad each image to a square and resize it to {s} x {s} before the processor")
    gaps.append("16-bit or DICOM input: the processor takes 8-bit images; chexfound reads DICOM (VOI LUT, "
                "MONOCHROME1) and 16-bit PNG itself")
    lines += [f"- {g}" for g in gaps]
    lines += [
        "",
        f"At {s} x {s} the outputs equal chexfound's. At other sizes transformers resizes the position "
        "embedding by output size, bicubic"
        + (", antialiased" if r else "")
        + f"; chexfound (as the original) by scale factor with offset {cfg.interpolate_offset:g}"
        + (", antialiased" if cfg.interpolate_antialias else ", without antialiasing")
        + ": features then differ slightly.",
        "",
        "## How to load",
        "",
        "```python",
        "import torch",
        f"from transformers import {'AutoModelForImageClassification' if head is not None else 'AutoModel'}, "
        "AutoImageProcessor",
        "",
        f"model = {'AutoModelForImageClassification' if head is not None else 'AutoModel'}"
        ".from_pretrained(\"PATH\").eval()   # no custom code",
        "processor = AutoImageProcessor.from_pretrained(\"PATH\")",
        "inputs = processor(images=image, return_tensors=\"pt\")  # image: PIL, min-max stretched (see Input)",
        "with torch.no_grad():",
    ]
    if head is not None:
        act = "softmax(-1)" if head.task == "multiclass" else "sigmoid()"
        lines += [f"    probs = model(**inputs).logits.{act}"]
    else:
        lines += ["    out = model(**inputs).last_hidden_state",
                  f"cls, patches = out[:, 0], out[:, 1 + {r}:]   # final-norm CLS and patch tokens"]
    lines += [
        "```",
        "",
        "With chexfound: `create_backbone(\"PATH\")` reads this folder back (Hugging Face Dinov2 layout).",
        f"Written for and checked with transformers {TRANSFORMERS_TESTED} (file names as transformers stores "
        "Dinov2, so 4.x loads them too).",
    ]
    if verified:
        lines += ["", "Checked at export: max |transformers - chexfound| = "
                      + ", ".join(f"{k} {v:.2e}" for k, v in verified.items()) + " (float32)."]
    return "\n".join(lines) + "\n"


# -- verification --
def verify_hf(folder: str | PathLike[str], backbone: nn.Module, head: Head | None = None,
              seed: int = 0) -> dict[str, float]:
    """Load `folder` with transformers (no custom code) and compare with ours on one random image at the native
    resolution: max |difference| of the CLS token, the patch tokens (and the logits). Raises CheckpointError
    when transformers reports missing, unexpected or mismatched weights."""
    import transformers

    cfg = backbone.cfg
    cls = transformers.AutoModelForImageClassification if head is not None else transformers.AutoModel
    hf, info = cls.from_pretrained(str(folder), output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise CheckpointError(folder, f"transformers loads the export with problems: {bad or info['error_msgs']}")
    hf = hf.float().eval()
    x = torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(seed))
    r = cfg.num_register_tokens
    model = backbone.float().eval()
    with torch.no_grad():
        ours = model.forward_features(x)
        if head is not None:
            out = hf(pixel_values=x)
            hidden = hf.get_submodule(hf_base_prefix(cfg))(pixel_values=x).last_hidden_state
            logits = head_forward(model, head.float().eval(), x).logits
        else:
            hidden = hf(pixel_values=x).last_hidden_state
    diffs = {"cls": float((hidden[:, 0] - ours["x_norm_clstoken"]).abs().max()),
             "patch_tokens": float((hidden[:, 1 + r:] - ours["x_norm_patchtokens"]).abs().max())}
    if head is not None:
        diffs["logits"] = float((out.logits - logits).abs().max())
    return diffs


def check_max_diff(diffs: dict[str, float], atol: float, name: Path) -> None:
    worst = max(diffs.values())
    if not worst <= atol:
        raise CheckpointError(name, f"transformers' outputs differ from chexfound's by {worst:.3g} "
                                    f"(tolerance {atol:g}): {diffs}")


def _transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def install_folder(tmp: Path, out: Path, last: str) -> None:
    """Move the files of `tmp` into `out` (created), `last` last: its arrival means the folder is complete."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in tmp.iterdir() if p.name != last) + [last]
    for n in names:
        (tmp / n).replace(out / n)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# -- the exports --
def export_hf(
    backbone: nn.Module,
    out: str | PathLike[str],
    head: Head | None = None,
    transform: InputTransform | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    allow_backbone_mismatch: bool = False,
) -> dict[str, Any]:
    """Write the transformers folder `out` (see the module docstring); returns {"path", "class", "files",
    "weights_sha256", "max_abs_diff" (when verified)}. Verification needs transformers; without it the files are
    written and "verified" is False."""
    out_dir = Path(out)
    info = info_of(backbone)
    cfg = backbone.cfg
    tf = transform or info.transform
    if tf.size != cfg.img_size:
        log.warning("the input transform's size %d differs from the model's native %d: the export is checked "
                    "and identical at %d", tf.size, cfg.img_size, cfg.img_size)
    extra: dict[str, Any] = {"chexfound": {
        "name": info.name, "weights_sha256": info.weights_sha256, "source": info.source, "format": info.format,
        "provenance": info.provenance(), "transform": tf.to_dict(), "project_version": __version__,
        "interpolate_offset": cfg.interpolate_offset, "interpolate_antialias": cfg.interpolate_antialias}}
    prefix = ""
    if head is not None:
        problem = hf_classifier_problem(head)
        if problem:
            raise ConfigError(getattr(getattr(head, "info", None), "source", None),
                              f"not exported to transformers: {problem}")
        head_info = getattr(head, "info", None)
        trained_on = getattr(head_info, "backbone_sha256", None)
        if trained_on and trained_on != info.weights_sha256 and not allow_backbone_mismatch:
            raise ConfigError(getattr(head_info, "source", None), f"the head was trained on backbone "
                                                                  f"{trained_on[:12]}..., not on this one "
                                                                  f"({info.weights_sha256[:12]}...)")
        extra.update(_head_config(head))
        extra["chexfound"].update({"task": head.task, "findings": list(head.findings),
                                   "thresholds": [float(t) for t in head.thresholds],
                                   "head_trained_on_sha256": trained_on})
        prefix = hf_base_prefix(cfg) + "."
    hf_class = hf_architecture(cfg, classifier=head is not None)
    config = hf_config(cfg, extra)
    config["architectures"] = [hf_class]
    tensors = hf_state_dict(backbone, prefix)
    if head is not None:
        lin = head.linear  # type: ignore[attr-defined]
        tensors["classifier.weight"] = lin.weight.detach().float().cpu().contiguous()
        tensors["classifier.bias"] = lin.bias.detach().float().cpu().contiguous()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"path": str(out_dir), "class": hf_class, "weights_sha256": info.weights_sha256}
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as t:
        tmp = Path(t)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "preprocessor_config.json", hf_preprocessor_config(tf))
        write_json(tmp / "config.json", config)
        diffs = None
        if verify and _transformers_available():
            diffs = verify_hf(tmp, backbone, head)
            check_max_diff(diffs, atol, out_dir)
            result["max_abs_diff"] = diffs
        elif verify:
            log.warning("transformers is not installed: the export was not loaded back to check it "
                        "(pip install 'chexfound[hf]')")
        result["verified"] = diffs is not None
        (tmp / "README.md").write_text(hf_model_card(info, tf, hf_class, head, diffs))
        result["files"] = sorted(p.name for p in tmp.iterdir())
        install_folder(tmp, out_dir, "config.json")
    return result
