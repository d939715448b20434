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
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from chexfound.adapt.attribution import CLS_ATTENTION
from chexfound.data.transform import InputTransform
from chexfound.errors import ConfigError
from chexfound.io import CXRImage, read_image
from chexfound.models.hub import is_hub_id, record, resolve_weights
from chexfound.runio import resolve_device
from chexfound.serve.bundle import Classifier, check_pairing, load_bundle, load_pair
from chexfound.serve.overlay import view_from_input
from chexfound.serve.prediction import CALL_TASKS, HeadReliability, Prediction

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

log = logging.getLogger(__name__)

# What `Predictor.predict` takes per item: a file, or an image already in memory.
ImageInput = Union[str, PathLike, CXRImage, np.ndarray, "PILImage"]

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
        bytes), a Hugging Face Hub id (`hf://OWNER/NAME[@REVISION][/FILE]`, `chexfound-vitl16`), a named
        architecture, or a `VisionTransformer`.
    head: a head file (`chexfound.adapt.load_head`: ours or the released glori.pth), a Hub id naming one
        (`hf://OWNER/NAME/FILE`), or a `Head`.
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
        # A Hub id names a file in the hub's cache: that file is what is hashed and shown (the id is provenance).
        if is_hub_id(backbone):
            self.backbone_path = pair.backbone_info.source
        if is_hub_id(head):
            self.head_path = pair.head_info.source
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
            if self.model.heatmap_kind == CLS_ATTENTION:
                # The CLS map reads the last attention layer's input through a hook, which compiled graphs
                # skip: that one block runs uncompiled.
                self.model.backbone.blocks[-1] = pair.backbone.blocks[-1]
        elif self.precision != "fp32" and self.device.type == "cpu":
            from chexfound.models.inference import InferenceSettings, prepare_backbone

            # The packed copy replaces the backbone (the eager one is freed: int8 holds ~1/4 of its memory).
            self.model.backbone = prepare_backbone(self.model.backbone, self.device,
                                                   InferenceSettings(compute=self.precision))
            if self.model.heatmap_kind == CLS_ATTENTION and hasattr(self.model.backbone, "blocks"):
                # The CLS map reads the last attention layer's input through a hook that packed blocks do not
                # call: that one block runs eager, in fp32 (the maps then match fp32's).
                self.model.backbone.blocks[-1] = pair.backbone.blocks[-1]
        self.head = pair.head
        self.findings: list[str] = list(pair.head.findings)
        self.thresholds: np.ndarray = pair.head.thresholds.detach().cpu().float().numpy().copy()
        self.threshold_rules = threshold_rules_of(pair.head_info.meta, pair.head)
        self.task: str = pair.head.task
        # Calibrator per finding and the informative verdicts the head file records (None: not judged).
        meta = dict(pair.head_info.meta or {})
        meta.setdefault("calibration", getattr(pair.head, "calibration_info", None))
        meta.setdefault("informative", getattr(pair.head, "informative", None))
        self.reliability = HeadReliability.from_head_meta(meta, self.findings)
        self._has_attention: bool | None = None

    @classmethod
    def from_bundle(cls, path: str | PathLike[str], **kwargs: Any) -> "Predictor":
        """A Predictor from one `chexfound export --format safetensors` file (or a Hugging Face Hub id of one)."""
        weights = resolve_weights(path)
        bb, hd, meta = load_bundle(weights.local)
        kwargs.setdefault("transform", InputTransform.from_dict(meta["transform"]))
        p = cls(bb, hd, **kwargs)
        p.backbone_path = p.head_path = str(weights.local)
        if weights.hub is not None:
            record(p.backbone_info.origin, weights)
            p.head_info.meta["hub"] = weights.hub.origin()
        return p

    @property
    def head_meta(self) -> dict[str, Any]:
        """The head file's metadata (selection, thresholds and how they were chosen, ...)."""
        return self.head_info.meta

    # -- identity --
    @property
    def grid_size(self) -> int:
        """Patch tokens per side of the model input (the side of each attention map)."""
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

    @property
    def heatmap_kind(self) -> str:
        """What the heatmaps show for this head (`chexfound.adapt.attribution`: glori_attention,
        linear_patch_contribution or cls_attention)."""
        return self.model.heatmap_kind

    @property
    def has_heatmaps(self) -> bool:
        """Every head has heatmaps (of the kind `heatmap_kind` says); `has_attention` is whether the head
        itself attends (GLoRI)."""
        return True

    def warmup(self, batch: int = 1) -> None:
        """One forward pass on blank images, so the first real request does not pay for lazy initialisation."""
        self.predict_tensor(torch.zeros(batch, 3, self.transform.size, self.transform.size))

    @property
    def head_type(self) -> str:
        """The head's type as recorded in its file (e.g. "glori", "linear"), else the module's."""
        return self.head_meta.get("head_type") or getattr(self.head, "head_type", "") or type(self.head).__name__

    @cached_property
    def head_file_sha256(self) -> str | None:
        """SHA-256 of the head file's bytes (None for an in-memory head)."""
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
                **({"hub": bi.origin["hub"]} if "hub" in bi.origin else {}),
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
                **({"hub": self.head_info.meta["hub"]} if "hub" in self.head_info.meta else {}),
                "heatmap_kind": self.heatmap_kind,
            },
            "findings": self.findings,
            "thresholds": [float(t) if np.isfinite(t) else None for t in self.thresholds],  # None: no call
            "threshold_rules": self.threshold_rules,
            # post-hoc calibrator per finding (none | temperature | platt | isotonic; null: not recorded)
            "calibration": list(self.reliability.calibration),
            # chexfound.stats.informative: whether the head can tell images apart, per finding and as a whole
            "informative": {**self.reliability.to_dict(self.findings),
                            "findings": list(self.reliability.informative)},
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
        """One image -> the model input: normalised float32 [3, S, S] by the predictor's input transform (resize,
        crop, min-max, mean/std, as recorded with the head). `image` is a `CXRImage` or its pixels ([H, W]
        float in [0, 1]); add the batch dimension (`[None]`) for `predict_tensor`."""
        pixels = image.pixels if isinstance(image, CXRImage) else image
        return self.transform(pixels)

    @staticmethod
    def as_image(item: CXRImage | np.ndarray | "PILImage") -> CXRImage:
        """An image already in memory as a `CXRImage`: a `CXRImage` as is; a [H, W] array (float in [0, 1];
        uint8 over 0..255; other integers min-max, like a 16-bit PNG); a grayscale PIL image (decoded as a file
        of its mode would be). Anything else raises ConfigError naming what is accepted."""
        from chexfound.io.image import normalise_range

        if isinstance(item, CXRImage):
            return item
        if isinstance(item, np.ndarray):
            if item.ndim != 2:
                raise ConfigError(None, f"an in-memory image must be a [H, W] grayscale array, got shape {item.shape}")
            if item.dtype == np.uint8:
                return CXRImage(normalise_range(item, 0, 255), {"source_format": "array"})
            if item.dtype.kind in "iu":
                return CXRImage(normalise_range(item), {"source_format": "array"})
            return CXRImage(np.clip(item.astype(np.float32), 0.0, 1.0), {"source_format": "array"})
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - Pillow is a core dependency
            Image = None  # type: ignore[assignment]
        if Image is not None and isinstance(item, Image.Image):
            from chexfound.io.raster import decode_raster

            return decode_raster(b"", "<in-memory PIL image>", im=item.copy())  # decode_raster closes its image
        raise ConfigError(None, f"cannot predict on a {type(item).__name__}: give a file path, a CXRImage "
                                f"(chexfound.io.read_image), a [H, W] numpy array or a PIL image")

    def _prediction(self, path: str | None, probs: np.ndarray | None, maps: np.ndarray | None,
                    error: str | None = None, image_meta: dict[str, Any] | None = None) -> Prediction:
        return Prediction(path=path, findings=self.findings, thresholds=self.thresholds, task=self.task,
                          probabilities=probs, attention=maps, error=error, image_meta=image_meta or {},
                          threshold_rules=self.threshold_rules, reliability=self.reliability)

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
                warned = batch.get("warnings", {})
                for j, (index, path) in enumerate(zip(batch["index"].tolist(), batch["path"])):
                    m = maps[j] if (maps is not None and keep_attention) else None
                    meta = {"warnings": warned[index]} if index in warned else None
                    out[int(index)] = self._prediction(str(path), probs[j], m, image_meta=meta)
                    if keep_view:
                        out[int(index)].view = view_from_input(batch["image"][j], self.transform)
            yield [out[i] for i in sorted(out)]

    def predict(
        self,
        paths: Sequence[ImageInput] | ImageInput,
        batch_size: int = 8,
        workers: int = 0,
        progress: bool = False,
    ) -> list[Prediction]:
        """Images -> one Prediction each, in order. Each item is a file (read with `read_image`) or an image
        already in memory (a `CXRImage`, a [H, W] array, a PIL image: see `as_image`). Unreadable files do not
        stop the run: their Prediction has `error` set (and no probabilities)."""
        if isinstance(paths, (str, PathLike, CXRImage, np.ndarray)) or type(paths).__module__.startswith("PIL."):
            paths = [paths]  # one image
        paths = list(paths)  # type: ignore[arg-type]
        if not all(isinstance(p, (str, PathLike)) for p in paths):
            return self._predict_mixed(paths, batch_size, workers, progress)
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

    def _predict_mixed(self, items: list[Any], batch_size: int, workers: int, progress: bool) -> list[Prediction]:
        """`predict` over files and in-memory images together: files through the loader, images in batches."""
        out: list[Prediction | None] = [None] * len(items)
        files = [i for i, x in enumerate(items) if isinstance(x, (str, PathLike))]
        if files:
            preds = self.predict([items[i] for i in files], batch_size=batch_size, workers=workers, progress=progress)
            for i, pred in zip(files, preds):
                out[i] = pred
        in_files = set(files)
        memory = [(i, self.as_image(x)) for i, x in enumerate(items) if i not in in_files]
        for start in range(0, len(memory), max(1, batch_size)):
            chunk = memory[start:start + batch_size]
            probs, maps = self.predict_tensor(torch.stack([self.preprocess(im) for _, im in chunk]))
            for j, (i, im) in enumerate(chunk):
                out[i] = self._prediction(im.meta.get("path"), probs[j], None if maps is None else maps[j],
                                          image_meta=im.meta)
        return [p for p in out if p is not None]

