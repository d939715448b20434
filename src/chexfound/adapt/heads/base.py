"""The head contract and its file format.

A head takes the backbone's `get_intermediate_layers(x, n, return_class_token=True)` output — a tuple over
the last n blocks of (patch_tokens[B, N, D], cls[B, D]) — and returns (logits[B, C], attention or None),
where attention is [B, heads, C, N_patches] for heads that attend over patches (GLoRI).

Head files (safetensors; `save_head` / `load_our_head`): tensors = the head's state dict (incl. the
`thresholds` buffer and, for regression, `target_mean`/`target_std`), metadata["chexfound"] =
    kind="head", head_type ("glori" | "linear" | "mlp"), task ("multilabel" | "binary" | "multiclass" |
    "regression" | "survival"), findings (output names, logit order), thresholds (per finding, chosen on
    validation), threshold_rules (per finding: the rule that chose it and its evidence, chexfound.stats.thresholds;
    absent in older files), n_blocks, config (constructor hyper-parameters), backbone_sha256 (state-dict hash of the
    backbone the features came from), backbone_config (ViTConfig dict), transform (InputTransform dict),
    plus extras written by `chexfound adapt`: selection (metric, lr, weight decay, epoch, val metrics),
    label_columns, uncertain, train_manifest, finetune;
    calibration (when a post-hoc calibrator was fitted: adapt/heads/calibration.py, its tensors `calibration.*`),
    informative (the validation evidence and the uninformative verdict, chexfound.stats.informative).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from chexfound.adapt.heads.calibration import Calibrator, calibrator_from_meta
from chexfound.errors import CheckpointError
from chexfound.models.card import ModelFile, ResultTable, backbone_of_head, head_facts, write_card
from chexfound.models.format import load_tensors, save_tensors

Features = Sequence[tuple[Tensor, Tensor]]
# The one registry of head types (name -> class), filled as each head class is defined (`Head.head_type`):
# the CLI's choices, the evaluate trainers, option checks and head files all read it.
HEAD_TYPES: dict[str, type["Head"]] = {}
TASKS = ("multilabel", "binary", "multiclass", "regression", "survival")


def output_dim(task: str, n_findings: int) -> int:
    """Logits per image: one per finding/class/target; one risk score for survival (Cox)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    return 1 if task == "survival" else n_findings


class Head(nn.Module):
    """A head over a frozen backbone's last `n_blocks` blocks: findings, task, decision thresholds (buffer), and
    `forward(features) -> (logits, attention maps or None)`."""
    head_type: ClassVar[str] = ""
    needs_tokens: ClassVar[bool] = False  # attends over patch tokens (pooled features are not enough)

    def __init__(self, findings: Sequence[str], n_blocks: int, task: str = "multilabel") -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {TASKS}")
        if task == "binary" and len(findings) != 1:
            raise ValueError(f"a binary head has exactly one finding, got {list(findings)}")
        if task == "multiclass" and len(findings) < 2:
            raise ValueError(f"a multiclass head needs at least two classes, got {list(findings)}")
        self.findings = list(findings)
        self.n_blocks = n_blocks
        self.task = task
        # Decision thresholds on probabilities, chosen on validation (0.5 until then).
        self.register_buffer("thresholds", torch.full((len(self.findings),), 0.5))
        # How each threshold was chosen (rule, reason, validation evidence): see chexfound.stats.thresholds.
        self.threshold_rules: list[dict[str, Any]] = []
        # Post-hoc calibration (None: probabilities as trained) and what chose it; the uninformative verdict.
        self.calibration: Calibrator | None = None
        self.calibration_info: dict[str, Any] | None = None
        self.informative: dict[str, Any] | None = None
        if task == "regression":
            # Heads regress standardised targets; predictions are mapped back with the training mean/std.
            self.register_buffer("target_mean", torch.zeros(len(self.findings)))
            self.register_buffer("target_std", torch.ones(len(self.findings)))

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.head_type:
            HEAD_TYPES[cls.head_type] = cls

    @property
    def num_classes(self) -> int:
        """Number of findings (classes) the head scores."""
        return len(self.findings)

    @property
    def out_dim(self) -> int:
        """Logits per image the task needs (`output_dim`: one per finding/class/target, one for survival)."""
        return output_dim(self.task, len(self.findings))

    @property
    def has_attention(self) -> bool:
        """Whether forward returns per-class attention over patches."""
        return False

    def set_thresholds(self, choices: Sequence[Any]) -> None:
        """Set the decision thresholds from `chexfound.stats.ThresholdChoice` records, keeping their rules."""
        self.thresholds.copy_(torch.as_tensor([float(c.threshold) for c in choices], dtype=torch.float32))
        self.threshold_rules = [c.to_dict() for c in choices]

    def hparams(self) -> dict[str, Any]:
        """Constructor keyword arguments (besides findings/n_blocks/task) needed to rebuild this head."""
        raise NotImplementedError

    def forward(self, features: Features) -> tuple[Tensor, Tensor | None]:
        """Features (per block: patch tokens [B, P, D], CLS [B, D]) -> (logits [B, out_dim], attention maps or
        None)."""
        raise NotImplementedError

    def set_calibration(self, calibrator: Calibrator | None, info: dict[str, Any] | None = None) -> None:
        """Install a fitted calibrator (applied by `probabilities` from now on) and the record of its choice."""
        self.calibration = calibrator
        self.calibration_info = None if calibrator is None else {
            **(info or {}), "task": calibrator.task, "n_knots": int(calibrator.knots_x.shape[1])}

    def probabilities(self, logits: Tensor) -> Tensor:
        """Calibrated when a calibrator is installed (multilabel, binary, multiclass), else as trained."""
        if self.calibration is not None and self.task in ("multilabel", "binary", "multiclass"):
            return self.calibration(logits)
        return self.raw_probabilities(logits)

    def raw_probabilities(self, logits: Tensor) -> Tensor:
        """The head's probabilities as trained, without post-hoc calibration."""
        if self.task == "multiclass":
            return logits.softmax(-1)
        if self.task in ("multilabel", "binary"):
            return logits.sigmoid()
        if self.task == "regression":
            return logits * self.target_std + self.target_mean
        return logits  # survival: the log hazard ratio (risk score)


def save_head(
    head: Head,
    path: str | PathLike[str],
    backbone_sha256: str | None = None,
    backbone_config: dict[str, Any] | None = None,
    transform: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    results: Sequence[ResultTable] = (),
) -> str:
    """Write `head` to `path` in our format (safetensors + metadata: head type, findings, hparams, thresholds, and
    the backbone it was trained on, which `load_head` and `Predictor` check) and its model card beside it (with
    the `results` the caller's run measured); returns the file's SHA-256."""
    meta = {
        "kind": "head",
        "head_type": head.head_type,
        "task": head.task,
        "findings": head.findings,
        # None: no threshold (the finding is never called; chexfound.stats.thresholds rule "none")
        "thresholds": [float(t) if torch.isfinite(t) else None for t in head.thresholds],
        "threshold_rules": list(getattr(head, "threshold_rules", [])),
        "n_blocks": head.n_blocks,
        "config": head.hparams(),
        "backbone_sha256": backbone_sha256,
        "backbone_config": backbone_config,
        "transform": transform,
        **({"calibration": head.calibration_info} if getattr(head, "calibration", None) is not None else {}),
        **({"informative": head.informative} if getattr(head, "informative", None) else {}),
        **(extra or {}),
    }
    sha = save_tensors(path, head.state_dict(), meta)
    n_params = sum(p.numel() for p in head.parameters())
    write_card(ModelFile(Path(path), "head", sha), backbone_of_head(meta), head=head_facts(meta, n_params),
               results=results)
    return sha


def head_class(name: str) -> type[Head]:
    """The head class registered as `name`; ValueError listing the known types for anything else."""
    if name not in HEAD_TYPES:
        raise ValueError(f"unknown head type {name!r}; known: {', '.join(HEAD_TYPES)}")
    return HEAD_TYPES[name]


def head_from_meta(meta: dict[str, Any]) -> Head:
    cls = HEAD_TYPES.get(meta.get("head_type", ""))
    if cls is None:
        raise CheckpointError(None, f"unknown head type {meta.get('head_type')!r}; known: {sorted(HEAD_TYPES)}")
    head = cls(findings=meta["findings"], n_blocks=meta["n_blocks"], task=meta.get("task", "multilabel"),
               **meta.get("config", {}))
    if meta.get("calibration"):  # its tensors are loaded with the head's state dict
        head.calibration = calibrator_from_meta(meta["calibration"], len(head.findings))
        head.calibration_info = dict(meta["calibration"])
    head.informative = meta.get("informative") or None
    return head


def load_our_head(path: str | PathLike[str]) -> tuple[Head, dict[str, Any]]:
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "head":
        raise CheckpointError(path, f"expected a head file, found kind={meta.get('kind')!r}")
    try:
        head = head_from_meta(meta)
    except CheckpointError as e:
        raise CheckpointError(path, e.reason) from e
    except (KeyError, TypeError, ValueError) as e:  # metadata without findings/n_blocks, or bad hparams
        raise CheckpointError(path, f"invalid head metadata ({type(e).__name__}: {e})") from e
    try:
        missing, unexpected = head.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shapes that disagree with the metadata (findings, embed_dim, ...)
        raise CheckpointError(path, f"head tensors do not match its metadata ({_first_line(e)})") from e
    if missing or unexpected:
        raise CheckpointError(path, f"head keys do not match: missing {missing}, unexpected {unexpected}")
    head.threshold_rules = list(meta.get("threshold_rules") or [])
    return head.eval(), meta


def _first_line(e: Exception) -> str:
    """The first line of torch's multi-line load_state_dict error, plus its first mismatch."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(e).__name__
