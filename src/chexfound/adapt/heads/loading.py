"""`load_head(path)`: any head file -> a Head carrying `head.info` (its file's metadata, typed).

The file's kind comes from its bytes: safetensors -> our head format (`save_head`); a torch checkpoint
(zip or legacy pickle) -> the original CheXFound `glori.pth` / linear-probe layouts (`chexfound.adapt.released`,
read with weights_only=True). Anything else, or one of our files of another kind (a backbone, a bundle), is a
CheckpointError naming the file and what it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Sequence

from chexfound.adapt.heads.base import Head


@dataclass
class HeadInfo:
    """What a head was trained on and how its outputs are called (besides findings/thresholds/task on the Head).

    backbone_sha256: the weights hash of the backbone its features came from (None: not recorded, e.g. the
        released glori.pth); `Predictor` refuses another backbone unless told to allow it.
    transform: the input transform its features were computed with (dict, as `InputTransform.to_dict`).
    meta: the file's whole metadata: selection, threshold rules, label columns, training manifest, ...
    """

    source: str | None
    format: str  # chexfound | chexfound_released | module
    backbone_sha256: str | None = None
    backbone_config: dict[str, Any] | None = None
    transform: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], source: str | None, fmt: str = "chexfound") -> "HeadInfo":
        """A HeadInfo from a head file's metadata (`source`: the file, `fmt`: its layout)."""
        return cls(source=source, format=fmt, backbone_sha256=meta.get("backbone_sha256") or None,
                   backbone_config=meta.get("backbone_config") or None, transform=meta.get("transform") or None,
                   meta=dict(meta))

    @property
    def threshold_rules(self) -> list[dict[str, Any]] | None:
        """Per finding, how its threshold was chosen (`chexfound.stats.thresholds`), as the head file records
        it; None for files that do not."""
        rules = self.meta.get("threshold_rules")
        return list(rules) if isinstance(rules, list) else None


def head_info(head: Head) -> HeadInfo:
    """The head's HeadInfo; for a head built in memory, one built from what it knows about itself."""
    info = getattr(head, "info", None)
    return info if isinstance(info, HeadInfo) else HeadInfo(source=None, format="module")


def load_head(path: str | PathLike[str], name: str | None = None, findings: Sequence[str] | None = None,
              num_heads: int = 8) -> Head:
    """A head file -> Head in eval mode with `head.info`: our safetensors heads, or the original `glori.pth` /
    linear-probe checkpoints (`name`, `findings`, `num_heads` only apply to those; see
    `chexfound.adapt.released`). `path` may be a Hugging Face Hub id naming the file
    (`hf://OWNER/NAME[@REVISION]/FILE`; its revision, commit and SHA-256 go into `head.info.meta["hub"]`)."""
    from chexfound.adapt.heads.base import load_our_head
    from chexfound.adapt.released import load_released_head
    from chexfound.models.hub import resolve_weights
    from chexfound.models.loaders.files import describe_kind, sniff_as, suffix_mismatch

    weights = resolve_weights(path, default_files=())  # a head repository holds more than one file: name it
    p, kind = sniff_as(weights.local, ("safetensors", "torch-zip", "torch-legacy"),
                       "a head file (chexfound safetensors head or a CheXFound glori.pth / linear-probe checkpoint)")
    note = suffix_mismatch(p, kind)
    if kind == "safetensors":
        head, meta = load_our_head(p)
        head.info = HeadInfo.from_meta(meta, str(p))
    else:
        head = load_released_head(p, name=name, findings=findings, num_heads=num_heads)
        head.info = HeadInfo(source=str(p), format="chexfound_released",
                             meta={"kind": "head", "head_type": head.head_type, "released": describe_kind(kind)})
    if note:
        head.info.meta.setdefault("notes", []).append(note)
    if weights.hub is not None:
        head.info.meta["hub"] = weights.hub.origin()
    return head


__all__ = ["HeadInfo", "head_info", "load_head"]
