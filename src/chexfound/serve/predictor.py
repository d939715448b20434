"""`Predictor`: a backbone + a head -> per-finding probabilities, calls and attention maps for any CXR.

The one object behind `chexfound predict`, `chexfound serve` and `chexfound export`:

    p = Predictor("backbone.safetensors", "head.safetensors")
    for pred in p.predict(["a.dcm", "b.png"]):
        print(pred.path, pred.positive_findings())
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from os import PathLike
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from chexfound.data.transform import InputTransform
from chexfound.errors import CheckpointError, ConfigError
from chexfound.io import CXRImage, read_image
from chexfound.runio import resolve_device

log = logging.getLogger(__name__)

# Tasks whose outputs are probabilities that a threshold turns into a positive/negative call.
CALL_TASKS = ("multilabel", "binary", "multiclass")


class Classifier(nn.Module):
    """Backbone + head as one module: normalised images [B, 3, S, S] -> (probabilities [B, C],
    attention maps [B, C, S/p, S/p] averaged over attention heads, or None for heads without attention).

    The same module is what `chexfound export` writes to ONNX, so served and exported outputs agree.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        feats = self.backbone.get_intermediate_layers(x, n=self.head.n_blocks, return_class_token=True)
        logits, attention = self.head(feats)
        probs = self.head.probabilities(logits.float())
        if attention is None:
            return probs, None
        # [B, heads, C, N] -> mean over heads -> [B, C, gh, gw]; patches are row-major like the backbone's.
        p = self.backbone.patch_size
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        maps = attention.float().mean(dim=1)
        return probs, maps.reshape(maps.shape[0], maps.shape[1], gh, gw)


@dataclass
class Prediction:
    """The result for one image. `probabilities` is None (and `error` says why) for unreadable files."""

    path: str | None
    findings: list[str]
    thresholds: np.ndarray
    task: str
    probabilities: np.ndarray | None = None
    attention: np.ndarray | None = None  # [C, gh, gw] or None
    error: str | None = None
    image_meta: dict[str, Any] = field(default_factory=dict)
    view: np.ndarray | None = None  # the model's view as float32 [D, D] in [0, 1] (for overlays), on request
    threshold_rules: list[dict[str, str]] | None = None  # per finding: {"rule", "reason"} the head recorded

    @property
    def ok(self) -> bool:
        return self.error is None

    def positives(self) -> np.ndarray | None:
        """Boolean call per finding at the head's thresholds (None for regression/survival outputs)."""
        if self.probabilities is None or self.task not in CALL_TASKS:
            return None
        return self.probabilities >= self.thresholds

    def positive_findings(self) -> list[str]:
        pos = self.positives()
        return [] if pos is None else [n for n, b in zip(self.findings, pos) if b]

    def ranked(self, top_k: int | None = None) -> list[int]:
        """Finding indices by decreasing probability (the first `top_k` when given)."""
        if self.probabilities is None:
            return []
        order = [int(i) for i in np.argsort(-self.probabilities, kind="stable")]
        return order if top_k is None else order[:top_k]

    def findings_list(self) -> list[dict[str, Any]]:
        """[{"name", "probability", "threshold", "positive", "threshold_rule", "threshold_reason"}] in the head's
        finding order (the rule that chose each threshold: chexfound.stats.thresholds)."""
        if self.probabilities is None:
            return []
        pos = self.positives()
        rules = self.threshold_rules or [{} for _ in self.findings]
        return [
            {
                "name": name,
                "probability": float(self.probabilities[i]),
                "threshold": float(self.thresholds[i]),
                "positive": None if pos is None else bool(pos[i]),
                "threshold_rule": rules[i].get("rule"),
                "threshold_reason": rules[i].get("reason"),
            }
            for i, name in enumerate(self.findings)
        ]

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "findings": self.findings_list(), "positive": self.positive_findings()}


def threshold_rules_of(head_meta: dict[str, Any], head: Any) -> list[dict[str, str]]:
    """Per finding {"rule", "reason"}: how the head's threshold was chosen (recorded since chexfound.stats),
    or "unrecorded" for older head files."""
    rules = head_meta.get("threshold_rules") or getattr(head, "threshold_rules", None) or []
    n = len(getattr(head, "findings", []))
    if len(rules) != n:
        return [{"rule": "unrecorded", "reason": "the head file does not record how its thresholds were chosen"}] * n
    return [{"rule": str(r.get("rule", "")), "reason": str(r.get("reason", ""))} for r in rules]


def check_pairing(head_meta: dict[str, Any], backbone_sha: str | None, head_path: Any, strict: bool) -> str | None:
    """Heads are trained on one backbone's features; on another backbone they output nonsense.
    Returns a warning message (or raises with `strict`) when the recorded backbone differs."""
    expected = head_meta.get("backbone_sha256")
    if not expected or not backbone_sha or expected == backbone_sha:
        return None
    msg = (f"head was trained on backbone {expected[:12]}..., but the given backbone is {backbone_sha[:12]}...; "
           "its outputs are not meaningful on this backbone")
    if strict:
        raise CheckpointError(head_path, msg)
    warnings.warn(f"{head_path}: {msg}", stacklevel=3)
    return msg


class Predictor:
    """Run a backbone + head on chest X-rays.

    backbone: a backbone file (`chexfound.models.load_backbone`) or a `VisionTransformer`.
    head: a head file (`chexfound.adapt.load_head`) or a `Head`.
    transform: the input transform; default: the one recorded with the head (what its features were
        computed with), else the backbone's, else the backbone config's.
    strict: raise (instead of warn) when the head was trained on a different backbone.
    compile: run each backbone block through torch.compile (static shapes; batches are padded to the next
        power of two so a server compiles a handful of shapes once). Pays on a GPU; off by default.
    """

    def __init__(
        self,
        backbone: str | PathLike[str] | nn.Module,
        head: str | PathLike[str] | nn.Module,
        device: str | torch.device | None = "auto",
        dtype: str = "fp32",
        transform: InputTransform | None = None,
        strict: bool = False,
        backbone_meta: dict[str, Any] | None = None,
        head_meta: dict[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        from chexfound.adapt.heads.base import load_our_head
        from chexfound.models import backbone_sha256, load_backbone

        self.backbone_path = None if isinstance(backbone, nn.Module) else str(backbone)
        self.head_path = None if isinstance(head, nn.Module) else str(head)
        if isinstance(backbone, nn.Module):
            bb, self.backbone_meta = backbone, dict(backbone_meta or {})
        else:
            bb, self.backbone_meta = load_backbone(backbone)
        if isinstance(head, nn.Module):
            hd, self.head_meta = head, dict(head_meta or {})
        elif Path(head).suffix == ".safetensors":
            hd, self.head_meta = load_our_head(head)
        else:  # other layouts (e.g. the released glori.pth) through the adapt loader; they carry no metadata
            from chexfound.adapt import load_head

            hd, self.head_meta = load_head(head), {}
        self.backbone_sha256: str = self.backbone_meta.get("weights_sha256") or backbone_sha256(bb)
        self.pairing_warning = check_pairing(self.head_meta, self.backbone_sha256, self.head_path or "head", strict)
        if hd.n_blocks > len(bb.blocks):
            raise CheckpointError(self.head_path, f"head reads the last {hd.n_blocks} blocks but the backbone has "
                                                  f"only {len(bb.blocks)}")

        self.transform = transform or self._default_transform(bb)
        if self.transform.size % bb.patch_size:
            raise ConfigError(None, f"input size {self.transform.size} is not a multiple of patch {bb.patch_size}")
        self.device = resolve_device(device)
        if dtype not in ("fp32", "bf16"):
            raise ConfigError(None, f"dtype must be fp32 or bf16, got {dtype!r}")
        self.dtype = dtype
        self.model = Classifier(bb, hd).to(self.device).eval()
        self.compiled = bool(compile)
        if self.compiled:
            from chexfound.models.inference import compile_blocks

            self.model.backbone = compile_blocks(self.model.backbone)
        self.head = hd
        self.findings: list[str] = list(hd.findings)
        self.thresholds: np.ndarray = hd.thresholds.detach().cpu().float().numpy().copy()
        self.threshold_rules = threshold_rules_of(self.head_meta, hd)
        self.task: str = hd.task
        self._has_attention: bool | None = None

    @classmethod
    def from_bundle(cls, path: str | PathLike[str], **kwargs: Any) -> "Predictor":
        """A Predictor from one `chexfound export --format safetensors` file."""
        from chexfound.serve.bundle import load_bundle

        bb, hd, meta = load_bundle(path)
        kwargs.setdefault("transform", InputTransform.from_dict(meta["transform"]))
        p = cls(bb, hd, backbone_meta=meta["backbone"], head_meta=meta["head"], **kwargs)
        p.backbone_path = p.head_path = str(path)
        return p

    def _default_transform(self, bb: nn.Module) -> InputTransform:
        head_tf, bb_tf = self.head_meta.get("transform"), self.backbone_meta.get("transform")
        if head_tf and bb_tf and InputTransform.from_dict(head_tf) != InputTransform.from_dict(bb_tf):
            log.warning("head and backbone record different input transforms; using the head's (%s)", head_tf)
        if head_tf or bb_tf:
            return InputTransform.from_dict(head_tf or bb_tf)
        return InputTransform.for_backbone(bb.cfg)

    # -- identity --
    @property
    def grid_size(self) -> int:
        return self.transform.size // self.model.backbone.patch_size

    @property
    def has_attention(self) -> bool:
        """Whether the head returns attention maps (heatmaps need them): as the head declares
        (`Head.has_attention`), or, for a module without that attribute, one forward pass on a blank image."""
        declared = getattr(self.head, "has_attention", None)
        if self._has_attention is None and isinstance(declared, bool):
            self._has_attention = declared
        if self._has_attention is None:
            _, maps = self.predict_tensor(torch.zeros(1, 3, self.transform.size, self.transform.size))
            self._has_attention = maps is not None
        return self._has_attention

    def warmup(self, batch: int = 1) -> None:
        """One forward pass on blank images, so the first real request does not pay for lazy initialisation."""
        self.predict_tensor(torch.zeros(batch, 3, self.transform.size, self.transform.size))

    @property
    def head_type(self) -> str:
        return self.head_meta.get("head_type") or getattr(self.head, "head_type", "") or type(self.head).__name__

    @cached_property
    def head_file_sha256(self) -> str | None:
        from chexfound.models.format import sha256_file

        return sha256_file(self.head_path) if self.head_path else None

    def info(self) -> dict[str, Any]:
        """What `GET /v1/model` reports: backbone and head identity, findings, thresholds, input transform."""
        cfg = self.model.backbone.cfg
        return {
            "backbone": {
                "path": Path(self.backbone_path).name if self.backbone_path else None,
                "name": cfg.name or None,
                "weights_sha256": self.backbone_sha256,
                "embed_dim": cfg.embed_dim,
                "depth": cfg.depth,
                "patch_size": cfg.patch_size,
                "num_register_tokens": cfg.num_register_tokens,
            },
            "head": {
                "path": Path(self.head_path).name if self.head_path else None,
                "file_sha256": self.head_file_sha256,
                "head_type": self.head_type,
                "task": self.task,
                "n_blocks": self.head.n_blocks,
                "trained_on_backbone_sha256": self.head_meta.get("backbone_sha256"),
                "pairing_warning": self.pairing_warning,
                "has_attention": self.has_attention,
            },
            "findings": self.findings,
            "thresholds": [float(t) for t in self.thresholds],
            "threshold_rules": self.threshold_rules,
            "transform": self.transform.to_dict(),
            "device": str(self.device),
            "dtype": self.dtype,
        }

    # -- inference --
    def _autocast(self) -> Any:
        if self.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def predict_tensor(self, x: Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised images [B, 3, S, S] -> (probabilities [B, C], attention maps [B, C, g, g] or None)."""
        n = x.shape[0]
        if self.compiled and n & (n - 1):  # compiled graphs are per shape: pad to the next power of two
            x = torch.cat([x, x.new_zeros((1 << n.bit_length()) - n, *x.shape[1:])])
        with self._autocast():
            probs, maps = self.model(x.to(self.device, non_blocking=True))
        probs, maps = probs[:n], None if maps is None else maps[:n]
        return probs.float().cpu().numpy(), None if maps is None else maps.float().cpu().numpy()

    def preprocess(self, image: CXRImage | np.ndarray) -> Tensor:
        pixels = image.pixels if isinstance(image, CXRImage) else image
        return self.transform(pixels)

    def _prediction(self, path: str | None, probs: np.ndarray | None, maps: np.ndarray | None,
                    error: str | None = None, image_meta: dict[str, Any] | None = None) -> Prediction:
        return Prediction(path=path, findings=self.findings, thresholds=self.thresholds, task=self.task,
                          probabilities=probs, attention=maps, error=error, image_meta=image_meta or {},
                          threshold_rules=self.threshold_rules)

    def predict_image(self, image: CXRImage | np.ndarray | str | PathLike[str]) -> Prediction:
        """One image (a file, a `CXRImage`, or a [H, W] array in [0, 1]) -> Prediction (raises CXRReadError)."""
        path = None
        if isinstance(image, (str, PathLike)):
            path, image = str(image), read_image(image)
        probs, maps = self.predict_tensor(self.preprocess(image)[None])
        meta = image.meta if isinstance(image, CXRImage) else {}
        return self._prediction(path, probs[0], None if maps is None else maps[0], image_meta=meta)

    def iter_batches(
        self,
        paths: Sequence[str | PathLike[str]],
        batch_size: int = 8,
        workers: int = 0,
        keep_attention: bool = True,
        keep_view: bool = False,
    ) -> Iterator[list[Prediction]]:
        """Yield one list of Predictions per batch (in input order; unreadable files come as error
        Predictions in the batch they were read in). `keep_view` adds the model's view for overlays."""
        from chexfound.serve.overlay import view_from_input

        from torch.utils.data import DataLoader

        from chexfound.data.datasets import ImageDataset, collate_skip_errors

        ds = ImageDataset(list(paths), self.transform)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip_errors,
                            shuffle=False, pin_memory=self.device.type == "cuda")
        for batch in loader:
            out: dict[int, Prediction] = {}
            for index, path, reason in batch["errors"]:
                out[int(index)] = self._prediction(str(path), None, None, error=reason)
            if "image" in batch:
                probs, maps = self.predict_tensor(batch["image"])
                for j, (index, path) in enumerate(zip(batch["index"].tolist(), batch["path"])):
                    m = maps[j] if (maps is not None and keep_attention) else None
                    out[int(index)] = self._prediction(str(path), probs[j], m)
                    if keep_view:
                        out[int(index)].view = view_from_input(batch["image"][j], self.transform)
            yield [out[i] for i in sorted(out)]

    def predict(
        self,
        paths: Sequence[str | PathLike[str]] | str | PathLike[str],
        batch_size: int = 8,
        workers: int = 0,
        progress: bool = False,
    ) -> list[Prediction]:
        """Files -> one Prediction each, in order. Unreadable files do not stop the run: their Prediction
        has `error` set (and no probabilities)."""
        if isinstance(paths, (str, PathLike)):
            paths = [paths]
        paths = list(paths)
        results: list[Prediction] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(paths), unit="img", desc="predict")
        for preds in self.iter_batches(paths, batch_size=batch_size, workers=workers):
            results.extend(preds)
            if bar is not None:
                bar.update(len(preds))
        if bar is not None:
            bar.close()
        return results

