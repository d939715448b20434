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
from functools import cached_property
from os import PathLike
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from chexfound.data.transform import InputTransform
from chexfound.errors import ConfigError
from chexfound.io import CXRImage, read_image
from chexfound.runio import resolve_device
from chexfound.serve.bundle import Classifier, check_pairing, load_bundle, load_pair
from chexfound.serve.overlay import view_from_input
from chexfound.serve.prediction import CALL_TASKS, Prediction

log = logging.getLogger(__name__)

__all__ = ["CALL_TASKS", "Classifier", "Prediction", "Predictor", "check_pairing", "threshold_rules_of"]


def threshold_rules_of(head_meta: dict[str, Any], head: Any) -> list[dict[str, str]]:
    """Per finding {"rule", "reason"}: how the head's threshold was chosen (recorded since chexfound.stats);
    "default" when none was chosen (every threshold still 0.5: no validation data, a multiclass head, the
    released glori.pth), else "unrecorded" for older head files."""
    rules = head_meta.get("threshold_rules") or getattr(head, "threshold_rules", None) or []
    n = len(getattr(head, "findings", []))
    if len(rules) != n:
        thresholds = getattr(head, "thresholds", None)
        if thresholds is not None and n and bool((torch.as_tensor(thresholds) == 0.5).all()):
            return [{"rule": "default", "reason": "0.5: no threshold was chosen on validation data"}] * n
        return [{"rule": "unrecorded", "reason": "the head file does not record how its thresholds were chosen"}] * n
    return [{"rule": str(r.get("rule", "")), "reason": str(r.get("reason", ""))} for r in rules]


class Predictor:
    """Run a backbone + head on chest X-rays.

    backbone: a backbone file (any layout `chexfound.models.create_backbone` reads; the kind comes from the
        bytes), a named architecture, or a `VisionTransformer`.
    head: a head file (`chexfound.adapt.load_head`: ours or the released glori.pth) or a `Head`.
    transform: the input transform; default: the one recorded with the head (what its features were
        computed with), else the backbone's.
    allow_backbone_mismatch: run a head trained on another backbone (a warning, recorded in `info()`);
        without it such a pair is refused with a CheckpointError. `strict` refuses it even when allowed.
    compile: run each backbone block through torch.compile (static shapes; batches are padded to the next
        power of two so a server compiles a handful of shapes once). Pays on a GPU; off by default.
    precision: "fp32" (default), "bf16" or "int8" (`chexfound.models.precision`); on a CPU, bf16 and int8 run
        the packed backbone (`chexfound.models.fast`) and are refused where the CPU lacks the instructions
        that make them fast, unless `allow_slow_precision`. `dtype` is its old name (fp32 | bf16).
    """

    def __init__(
        self,
        backbone: str | PathLike[str] | nn.Module,
        head: str | PathLike[str] | nn.Module,
        device: str | torch.device | None = "auto",
        dtype: str | None = None,
        transform: InputTransform | None = None,
        strict: bool = False,
        allow_backbone_mismatch: bool = False,
        compile: bool = False,
        precision: str = "fp32",
        allow_slow_precision: bool = False,
    ) -> None:
        self.backbone_path = None if isinstance(backbone, nn.Module) else str(backbone)
        self.head_path = None if isinstance(head, nn.Module) else str(head)
        pair = load_pair(backbone, head, allow_backbone_mismatch=allow_backbone_mismatch and not strict,
                         transform=transform)
        self.backbone_info = pair.backbone_info
        self.head_info = pair.head_info
        self.backbone_sha256: str = pair.backbone_info.weights_sha256
        self.pairing_warning = pair.pairing_warning
        self.transform = pair.transform
        self.device = resolve_device(device)
        if dtype is not None:
            warnings.warn("Predictor(dtype=...) is deprecated; use precision=", DeprecationWarning, stacklevel=2)
            if dtype not in ("fp32", "bf16"):
                raise ConfigError(None, f"dtype must be fp32 or bf16, got {dtype!r}")
            precision = dtype
        from chexfound.models.precision import check_precision

        self.precision: str = check_precision(precision, self.device, allow_slow=allow_slow_precision)
        self.model = Classifier(pair.backbone, pair.head).to(self.device).eval()
        self.compiled = bool(compile)
        if self.compiled:
            if self.precision == "int8":
                raise ConfigError(None, "--compile and --precision int8 do not combine (int8 runs the packed CPU path)")
            from chexfound.models.inference import compile_blocks

            self.model.backbone = compile_blocks(self.model.backbone)
        elif self.precision != "fp32" and self.device.type == "cpu":
            from chexfound.models.inference import InferenceSettings, prepare_backbone

            # The packed copy replaces the backbone (the eager one is freed: int8 holds ~1/4 of its memory).
            self.model.backbone = prepare_backbone(self.model.backbone, self.device,
                                                   InferenceSettings(compute=self.precision))
        self.head = pair.head
        self.findings: list[str] = list(pair.head.findings)
        self.thresholds: np.ndarray = pair.head.thresholds.detach().cpu().float().numpy().copy()
        self.threshold_rules = threshold_rules_of(pair.head_info.meta, pair.head)
        self.task: str = pair.head.task
        self._has_attention: bool | None = None

    @classmethod
    def from_bundle(cls, path: str | PathLike[str], **kwargs: Any) -> "Predictor":
        """A Predictor from one `chexfound export --format safetensors` file."""
        bb, hd, meta = load_bundle(path)
        kwargs.setdefault("transform", InputTransform.from_dict(meta["transform"]))
        p = cls(bb, hd, **kwargs)
        p.backbone_path = p.head_path = str(path)
        return p

    @property
    def head_meta(self) -> dict[str, Any]:
        """The head file's metadata (selection, thresholds and how they were chosen, ...)."""
        return self.head_info.meta

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
        """What `GET /v1/model` reports: backbone identity (name, size, input resolution, where it came from),
        head identity, findings, thresholds, input transform."""
        cfg = self.model.backbone.cfg
        bi = self.backbone_info
        return {
            "backbone": {
                "path": Path(self.backbone_path).name if self.backbone_path else None,
                "name": bi.name or cfg.name or None,
                "num_params": bi.num_params or sum(p.numel() for p in self.model.backbone.parameters()),
                "input_size": self.transform.size,
                "provenance": bi.provenance(),
                "format": bi.format,
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
                "trained_on_backbone_sha256": self.head_info.backbone_sha256,
                "pairing_warning": self.pairing_warning,
                "has_attention": self.has_attention,
            },
            "findings": self.findings,
            "thresholds": [float(t) for t in self.thresholds],
            "threshold_rules": self.threshold_rules,
            "transform": self.transform.to_dict(),
            "device": str(self.device),
            "precision": self.precision,
            "dtype": self.dtype,
        }

    @property
    def dtype(self) -> str:
        """The old name of `precision`."""
        return self.precision

    # -- inference --
    def _autocast(self) -> Any:
        if self.precision == "bf16":
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

