"""Model cards: a Markdown file beside every model this package writes.

Where: `X.safetensors` -> `X.md`, `X.onnx` -> `X.md`, `teacher_checkpoint.pth` -> `teacher_checkpoint.md`; a
model that is a folder (a Hugging Face export) gets `README.md` inside it, the name the Hub shows. One card per
file, named after it, because folders hold several models side by side (a pretraining run's teacher in two
layouts, an adapt run's heads, the demo's backbones and heads) and a card must say which file it describes.

What: the model's identity (name, architecture, parameter count, input size, the file's and the weights'
SHA-256, provenance, from `ModelInfo`), its data and their licences, intended use (research; not for clinical
use), the results the run that wrote it measured (only those: a caller passes `ResultTable`s built from what
its run wrote, see `chexfound.models.card_results`; no results means the card says none were measured), the
input transform, and how to load it. Every writer calls `write_card`; the card is written atomically after
the model file, so a card never describes a file that is not there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from chexfound.models.info import ModelInfo, format_params

Kind = Literal["backbone", "teacher_checkpoint", "shards", "head", "classifier", "onnx", "hf"]

__all__ = ["HeadFacts", "ModelFile", "ResultTable", "backbone_of_head", "card_path", "head_facts", "render_card",
           "write_card"]


@dataclass(frozen=True)
class ResultTable:
    """Measured numbers for the card, with where they come from. Cells: str, int, float (4 decimals, NaN as
    n/a) or a (low, high) pair (a 95% CI)."""

    title: str
    source: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeadFacts:
    """A classifier head's side of a card (head files, classifier bundles, ONNX exports)."""

    head_type: str
    task: str
    findings: tuple[str, ...]
    thresholds: tuple[float, ...] = ()
    threshold_rules: tuple[str, ...] = ()
    n_params: int = 0
    trained_on: str = ""  # the training manifest, when recorded


@dataclass(frozen=True)
class ModelFile:
    path: Path
    kind: Kind
    sha256: str  # of the file itself (`sha256sum`); for a folder, of its weights file ("" for shards: per file)
    extra_files: tuple[str, ...] = field(default=())  # files that belong to it (ONNX external data, ...)


def card_path(model_path: str | PathLike[str]) -> Path:
    """Where the card of `model_path` goes: `X.md` beside a file, `README.md` inside a folder."""
    p = Path(model_path)
    return p / "README.md" if p.is_dir() else p.with_suffix(".md")


def write_card(file: ModelFile, backbone: ModelInfo | None, *, head: HeadFacts | None = None,
               results: Sequence[ResultTable] = ()) -> Path:
    """Render and write the card of `file` atomically; returns its path."""
    from chexfound.runio import atomic_write_text

    out = card_path(file.path)
    atomic_write_text(out, render_card(file, backbone, head=head, results=results))
    return out


def head_facts(meta: Mapping[str, Any], n_params: int = 0) -> HeadFacts:
    """A head's card facts from its file metadata (`chexfound.adapt.save_head` writes it)."""
    rules = [r.get("rule", "") if isinstance(r, dict) else str(r) for r in meta.get("threshold_rules") or []]
    return HeadFacts(head_type=str(meta.get("head_type", "?")), task=str(meta.get("task", "multilabel")),
                     findings=tuple(meta.get("findings") or ()),
                     # a finding with no call (rule "none") has no threshold: NaN, shown as "none"
                     thresholds=tuple(math.nan if t is None else float(t) for t in meta.get("thresholds") or ()),
                     threshold_rules=tuple(rules),
                     n_params=n_params, trained_on=str(meta.get("train_manifest") or meta.get("trained_on") or ""))


def backbone_of_head(meta: Mapping[str, Any]) -> ModelInfo | None:
    """What a head file records of the backbone it was trained on, as a `ModelInfo` (None if it records no
    config)."""
    from chexfound.data.transform import InputTransform
    from chexfound.models.config import ViTConfig

    cfg, tf = meta.get("backbone_config"), meta.get("transform")
    try:
        config = ViTConfig.from_dict(cfg) if isinstance(cfg, dict) else None
        transform = InputTransform.from_dict(tf) if tf else None
    except (TypeError, ValueError):  # a config this version cannot read: the card leaves the backbone out
        return None
    if config is None:
        return None
    return ModelInfo(name=config.name, config=config, transform=transform or InputTransform.for_backbone(config),
                     weights_sha256=str(meta.get("backbone_sha256") or "not recorded"), source="",
                     format="chexfound", origin={"source": "the backbone the head was trained on (the weights "
                                                           "SHA-256 above; another backbone is refused)"})


# -- rendering ------------------------------------------------------------------------------------------------
_WHAT = {
    "backbone": "a feature extractor (vision transformer backbone) in this package's safetensors format",
    "teacher_checkpoint": "a pretraining teacher (backbone + DINO/iBOT heads) in the original CheXFound "
                          "`teacher_checkpoint.pth` layout",
    "head": "a classifier head on a frozen backbone's features, in this package's safetensors format",
    "classifier": "a classifier (backbone + head) in one safetensors bundle",
    "onnx": "a classifier (backbone + head) exported to ONNX",
    "hf": "a backbone exported for Hugging Face `transformers`",
    "shards": "a backbone as bf16 safetensors shards (small files for capped transfers)",
}


def render_card(file: ModelFile, backbone: ModelInfo | None, *, head: HeadFacts | None = None,
                results: Sequence[ResultTable] = ()) -> str:
    """The card as Markdown (see the module docstring)."""
    name = file.path.name
    title = file.path.stem
    if file.kind in ("backbone", "teacher_checkpoint", "hf", "shards") and backbone is not None and backbone.name:
        title = f"{backbone.name} ({name})"
    md = _hub_header(backbone) if file.kind == "hf" else []
    md += [f"# {title}", "", f"`{name}` is {_WHAT[file.kind]}, written by chexfound, an open implementation of "
          "CheXFound (Yang et al., arXiv 2502.05142).", ""]
    md += _identity(file, backbone, head)
    md += _data(backbone, head)
    md += _intended_use()
    md += _results(results)
    md += _transform(backbone)
    md += _loading(file)
    return "\n".join(md).rstrip() + "\n"


def _hub_header(info: ModelInfo | None) -> list[str]:
    """The YAML block the Hugging Face Hub reads from a README (a licence only where the weights' is known)."""
    head = ["---", "library_name: transformers", "pipeline_tag: image-feature-extraction",
            "tags: [chest-x-ray, radiology, dinov2, chexfound, self-supervised]"]
    if _from_chexfound_release(info):
        head.append("license: apache-2.0")
    return head + ["---", ""]


def _row(key: str, value: Any) -> str:
    return f"| {key} | {value} |"


def architecture(cfg: Any) -> str:
    """'ViT (DINOv2-style), patch 16, width 1024, depth 24, 16 heads, 4 registers, SwiGLU FFN, LayerScale'."""
    parts = [f"ViT (DINOv2-style), patch {cfg.patch_size}", f"width {cfg.embed_dim}", f"depth {cfg.depth}",
             f"{cfg.num_heads} attention heads", f"{cfg.num_register_tokens} register tokens",
             "SwiGLU FFN" if cfg.ffn_layer == "swiglu" else f"MLP FFN (ratio {cfg.mlp_ratio:g})"]
    if cfg.layerscale_init is not None:
        parts.append("LayerScale")
    return ", ".join(parts)


def _identity(file: ModelFile, info: ModelInfo | None, head: HeadFacts | None) -> list[str]:
    md = ["## The model", "", "| | |", "|---|---|", _row("file", f"`{file.path.name}`")]
    if file.sha256:
        md.append(_row("file SHA-256", f"`{file.sha256}`"))
    for extra in file.extra_files:
        md.append(_row("with", extra if " " in extra else f"`{extra}`"))
    if info is not None:
        md += [_row("backbone", f"`{info.name or 'unnamed'}`"), _row("architecture", architecture(info.config)),
               _row("backbone parameters", f"{format_params(info.num_params)} ({info.num_params:,})"
                    if info.num_params else "not recorded"),
               _row("input size", f"{info.input_size} x {info.input_size} px"),
               _row("backbone weights SHA-256", f"`{info.weights_sha256}` (of the tensors: what heads record)"),
               _row("provenance", info.provenance())]
        if info.source and Path(info.source).name != file.path.name:  # the name only: no local folders on a card
            src = info.source if "://" in info.source else Path(info.source).name
            md.append(_row("made from", f"`{src}` ({info.format})"))
    if head is not None:
        md += [_row("head", f"{head.head_type}, task {head.task}"),
               _row("head parameters", f"{format_params(head.n_params)} ({head.n_params:,})" if head.n_params
                    else "not recorded"),
               _row("outputs", f"{len(head.findings)}: " + ", ".join(head.findings))]
        if head.trained_on:
            md.append(_row("trained on", f"`{head.trained_on}`"))
    md.append("")
    if head is not None and head.thresholds:
        md += ["Decision thresholds (probability at or above which a finding is called) and the rule that chose "
               "each:", "", "| output | threshold | rule |", "|---|---|---|"]
        rules = list(head.threshold_rules) + [""] * len(head.thresholds)
        md += [f"| {f} | {'none (no call)' if math.isnan(t) else _cell(t)} | {r or 'not recorded'} |"
               for f, t, r in zip(head.findings, head.thresholds, rules)]
        md.append("")
    return md


# Datasets this package reads, recognised in the data paths a model records, with the terms they come under.
_DATASETS = {
    "nih": ("NIH ChestX-ray14", "no restrictions on use; attribution required: "
            "https://nihcc.app.box.com/v/ChestXray-NIHCC, Wang et al., \"ChestX-ray8: Hospital-scale Chest X-ray "
            "Database and Benchmarks\", CVPR 2017, and the NIH Clinical Center as the provider"),
    "kermany": ("Kermany et al. paediatric chest X-rays (Guangzhou)", "CC BY 4.0: Kermany et al., Cell 2018, "
                "Mendeley Data doi:10.17632/rscbjbr9sj.2"),
}
_CHEXFOUND_TERMS = ("The CheXFound release (Yang et al., arXiv 2502.05142; weights by DIAL-RPI): its source "
                    "files carry Apache-2.0 headers inherited from DINOv2, and the Hugging Face release states "
                    "Apache-2.0; its repository has no LICENSE file. Its pretraining corpus is the authors' (about "
                    "one million chest radiographs from public datasets, each under its own terms).")


def _data_paths(info: ModelInfo | None, head: HeadFacts | None) -> list[str]:
    paths: list[str] = []
    ssl = info.origin.get("ssl") if info is not None else None
    if isinstance(ssl, dict):
        paths += [str(p) for p in ssl.get("data") or []]
    if head is not None and head.trained_on:
        paths.append(head.trained_on)
    return paths


def _from_chexfound_release(info: ModelInfo | None) -> bool:
    if info is None:
        return False
    formats = [info.format]
    src = info.origin.get("source")
    if isinstance(src, dict):
        formats.append(str(src.get("format", "")))
    return any("official" in f or f.startswith("CheXFound (") for f in formats)


def _data(info: ModelInfo | None, head: HeadFacts | None) -> list[str]:
    md = ["## Data and licences", ""]
    paths = _data_paths(info, head)
    ssl = info.origin.get("ssl") if info is not None else None
    if isinstance(ssl, dict):
        n = ssl.get("n_images")
        md.append(f"- Backbone pretrained by chexfound's self-supervised recipe (preset `{ssl.get('preset')}`, "
                  f"{ssl.get('iterations')} iterations" + (f", {n} images" if n is not None else "") + ").")
    if isinstance(ssl, dict) and ssl.get("init_from"):
        md.append(f"- Started from `{ssl['init_from']}` (`pretrain --init-from`): the data and terms of those weights "
                  "apply too.")
    if paths:
        md.append("- Data recorded with this model: " + ", ".join(f"`{p}`" for p in paths) + ".")
    seen = [k for k in _DATASETS if any(k in p.lower() for p in paths)]
    for k in seen:
        md.append(f"- {_DATASETS[k][0]}: {_DATASETS[k][1]}.")
    if paths and len(seen) < len(paths):
        md.append("- Any other data listed above comes under its own licence: check it before you share results.")
    if _from_chexfound_release(info):
        md.append(f"- {_CHEXFOUND_TERMS}")
    elif info is not None and info.format == "random":
        md.append("- Randomly initialised weights: no data.")
    if not paths and not _from_chexfound_release(info) and not isinstance(ssl, dict):
        md.append("- The file records no training data.")
    md += ["- chexfound itself follows CheXFound and DINOv2 (Apache-2.0); results on the datasets above carry "
           "their attributions.", ""]
    return md


def _intended_use() -> list[str]:
    return ["## Intended use", "",
            "Research on chest radiograph representation learning: feature extraction, linear probes and "
            "classifier heads, and their evaluation against baselines.", "",
            "**Not for clinical use.** This model is not a medical device. It has not been validated for "
            "diagnosis, triage, screening or any decision about a patient's care, and must not be used for them. "
            "Its outputs can be wrong in ways that are not visible, and performance on data unlike its training "
            "and test data (other hospitals, scanners, populations, views, children vs adults) is unknown.", ""]


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "n/a" if v is None else str(v)
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, (int, float)) or x is None for x in v):
        return f"[{_cell(None if v[0] is None else float(v[0]))}, {_cell(None if v[1] is None else float(v[1]))}]"
    return str(v).replace("|", "/")


def _results(results: Sequence[ResultTable]) -> list[str]:
    md = ["## Results", ""]
    if not results:
        return md + ["No measured results come with this file: the run that wrote it measured none. Evaluate it "
                     "before relying on it (`chexfound evaluate`).", ""]
    for t in results:
        md += [f"### {t.title}", "", f"From `{t.source}`.", "", "| " + " | ".join(t.columns) + " |",
               "|" + "|".join("---" for _ in t.columns) + "|"]
        md += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
        md.append("")
        md += [f"- {n}" for n in t.notes]
        if t.notes:
            md.append("")
    return md


def _transform(info: ModelInfo | None) -> list[str]:
    md = ["## Input transform", ""]
    if info is None:
        return md + ["Not recorded with this file.", ""]
    t = info.transform
    geometry = ("resize the shorter side to {s} px (bicubic, antialiased), centre-crop to {s} x {s}"
                if t.mode == "crop" else
                "resize the longer side to {s} px (bicubic, antialiased), pad to {s} x {s}").format(s=t.size)
    steps = ["read the image as grayscale in [0, 1] (DICOM: rescale, VOI LUT or window, MONOCHROME1 inverted)",
             geometry]
    if t.minmax_rescale:
        steps.append("min-max rescale each image to [0, 1]")
    steps += ["repeat to 3 channels", f"normalise per channel: mean {list(t.mean)}, std {list(t.std)}"]
    md += [f"{i}. {s}" for i, s in enumerate(steps, 1)]
    return md + ["", "`chexfound.data.InputTransform` does exactly this (`model.info.transform`); `predict`, "
                 "`embed` and `serve` apply it for you.", ""]


def _loading(file: ModelFile) -> list[str]:
    n = file.path.name
    md = ["## How to load", ""]
    if file.kind == "shards":
        md += ["```python", "from chexfound.ssl.checkpoint import load_backbone_shards", "",
               f'model, meta = load_backbone_shards("{n}")  # checks every shard against the fp32 weights SHA-256',
               "```", ""]
    elif file.kind in ("backbone", "teacher_checkpoint"):
        md += ["```python", "import torch", "from chexfound.io import read_image",
               "from chexfound.models import create_backbone", "", f'model = create_backbone("{n}")',
               'x = model.info.transform(read_image("scan.dcm").pixels)[None]',
               "with torch.no_grad():",
               "    feats = model.get_intermediate_layers(x, n=4, return_class_token=True)", "```", "",
               "```bash", f"chexfound embed --backbone {n} --manifest images.csv --out feats.safetensors",
               f"chexfound adapt --backbone {n} --train labels.csv --head glori --out runs/heads",
               f"chexfound pretrain --config PRESET --init-from {n} --data DIR --out runs/cont  # same architecture",
               f"chexfound export --format onnx --backbone {n} --head H.safetensors --out model.onnx", "```", ""]
        if file.kind == "teacher_checkpoint":
            md += ["The original CheXFound and DINOv2 tools read its `teacher` entry; `pretrain --init-from` keeps "
                   "its DINO/iBOT heads.", ""]
    elif file.kind == "head":
        md += ["```python", "from chexfound import Predictor", "from chexfound.adapt import load_head", "",
               f'head = load_head("{n}")', f'preds = Predictor("backbone.safetensors", "{n}").predict(["a.dcm"])',
               "```", "", "```bash", f"chexfound predict --backbone backbone.safetensors --head {n} --out preds.csv "
               "images/", "```", "",
               "The backbone must be the one it was trained on (its weights SHA-256 above); another is refused.", ""]
    elif file.kind == "classifier":
        md += ["```python", "from chexfound import Predictor", "",
               f'preds = Predictor.from_bundle("{n}").predict(["a.dcm"])', "```", "", "```bash",
               f"chexfound predict --model {n} --out preds.csv images/", "```", ""]
    elif file.kind == "onnx":
        md += ["Runs without PyTorch or chexfound. Input `image`: float32 [batch, 3, S, S] after the input "
               "transform above; outputs `probabilities` (and `attention` for attention heads). Findings, "
               "thresholds and the transform are in the model's metadata (`chexfound` entry).", "",
               "```python", "import json, onnx, onnxruntime as ort", "",
               f'meta = json.loads({{p.key: p.value for p in onnx.load("{n}").metadata_props}}["chexfound"])',
               f'session = ort.InferenceSession("{n}", providers=["CPUExecutionProvider"])',
               'probabilities = session.run(None, {"image": x})[0]  # x: float32 [B, 3, S, S], normalised',
               "```", "", "With chexfound: `chexfound.serve.export.onnx_session`, `read_onnx_metadata`.", ""]
    elif file.kind == "hf":
        md += ["```python", "from transformers import AutoModel", "", f'model = AutoModel.from_pretrained("{n}")',
               "out = model(pixel_values=x)  # x: float32 [B, 3, S, S] after the input transform above",
               "cls = out.last_hidden_state[:, 0]  # the final-norm CLS token", "```", "",
               f"With chexfound: `create_backbone(\"{n}\")`.", ""]
    return md
