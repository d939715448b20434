"""Who made a result: the model's identity as the DICOM and FHIR reports state it (name, version, weights)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chexfound import __version__


@dataclass(frozen=True)
class AlgorithmIdentity:
    """name: the model (head type on backbone); version: this package's; the SHA-256 of the backbone weights
    and of the head file identify the exact weights; heatmap_kind: what the maps show (chexfound.adapt.attribution)."""

    name: str
    version: str
    backbone_sha256: str
    head_sha256: str | None
    task: str
    heatmap_kind: str | None = None
    manufacturer: str = "chexfound"

    @classmethod
    def of(cls, predictor: Any) -> "AlgorithmIdentity":
        info = predictor.info()
        backbone = info["backbone"].get("name") or info["backbone"].get("path") or "backbone"
        return cls(name=f"chexfound {info['head']['head_type']} head on {backbone}", version=__version__,
                   backbone_sha256=predictor.backbone_sha256, head_sha256=info["head"].get("file_sha256"),
                   task=predictor.task, heatmap_kind=info["head"].get("heatmap_kind"))

    def parameters(self) -> list[str]:
        """The identity as `key: value` lines (SR Algorithm Parameters, FHIR Device properties)."""
        out = [f"backbone weights SHA-256: {self.backbone_sha256}",
               f"head file SHA-256: {self.head_sha256 or 'unknown (head not loaded from a file)'}",
               f"task: {self.task}"]
        if self.heatmap_kind:
            out.append(f"heatmap kind: {self.heatmap_kind}")
        return out
