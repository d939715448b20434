"""`ModelInfo`: what a backbone is and where it came from, carried on the model as `model.info`.

`chexfound.models.create_backbone` attaches one to every model it returns (timm keeps `pretrained_cfg` on
its models the same way), so callers never unpack an untyped metadata dict: the config, the input transform
the weights expect, the weights' SHA-256, the model's name and its provenance travel with the module and are
written back into our file format by `save_backbone`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from chexfound.models.config import ViTConfig

if TYPE_CHECKING:
    from chexfound.data.transform import InputTransform

# What each `ModelInfo.format` id is, in words.
FORMAT_NAMES = {
    "chexfound": "chexfound safetensors",
    "chexfound_hub": "CheXFound (Hugging Face Hub layout)",
    "chexfound_shards": "chexfound backbone shards (safetensors)",
    "chexfound_official": "CheXFound teacher_checkpoint.pth (Google Drive release)",
    "dinov2": "DINOv2 .pth state dict",
    "hf_dinov2": "Hugging Face Dinov2Model / Dinov2WithRegistersModel",
    "random": "random initialisation",
}
# File-metadata keys that `save_backbone` writes itself; everything else in a backbone file is provenance.
_FILE_KEYS = ("format_version", "project_version", "kind", "config", "transform", "weights_sha256", "head_names")


@dataclass
class ModelInfo:
    """Identity and provenance of one backbone.

    name: the registry entry, the pretraining preset it was derived under (e.g. `demo_tiny`), or the file's
        config name; never the name of a registry entry the weights were merely derived from.
    source: the file it was loaded from, or `registry:<name>` for freshly initialised weights.
    format: `chexfound` (ours), `chexfound_hub`, `chexfound_official`, `dinov2`, `hf_dinov2`, or `random`
        (`format_name` says it in words, e.g. "CheXFound (Hugging Face Hub layout)").
    config_source: where the architecture came from (file metadata, config.yaml, a named config, ...).
    origin: provenance carried in the file (`ssl`: the pretraining run; `source`: the converted file;
        `random_init`: the seed; `hub`: the Hugging Face Hub id, revision, commit and file SHA-256) - what
        "where it came from" means on the page and in `embed`.
    weights_sha256: `state_dict_sha256` of the weights as loaded; heads record it to refuse other backbones.
    heads: SSL or classifier heads that came with the weights ({name: {param: tensor}}).
    """

    name: str
    config: ViTConfig
    transform: InputTransform
    weights_sha256: str
    source: str
    format: str
    config_source: str = ""
    num_params: int = 0
    origin: dict[str, Any] = field(default_factory=dict)
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source_dtypes: list[str] = field(default_factory=list)

    @property
    def input_size(self) -> int:
        """Side in pixels of the model input (the transform's crop)."""
        return self.transform.size

    @property
    def format_name(self) -> str:
        """The file layout in words (e.g. "CheXFound (Hugging Face Hub layout)" for `chexfound_hub`)."""
        return FORMAT_NAMES.get(self.format, self.format)

    def provenance(self) -> str:
        """One line saying where the weights came from."""
        ssl = self.origin.get("ssl")
        if isinstance(ssl, dict):
            parts = [f"pretrained with preset {ssl.get('preset')}" if ssl.get("preset") else "pretrained"]
            if ssl.get("iterations") is not None:
                parts.append(f"{ssl['iterations']} iterations")
            if ssl.get("n_images") is not None:
                parts.append(f"{ssl['n_images']} images")
            if ssl.get("init_from"):
                parts.append(f"continued from {ssl['init_from']}")
            return ", ".join(parts)
        src = self.origin.get("source")
        if isinstance(src, dict) and src.get("path"):
            return f"converted from {src['path']} ({src.get('format', '?')})"
        if isinstance(src, str) and src:
            return src
        hub = self.origin.get("hub")
        if isinstance(hub, dict) and hub.get("id"):
            commit = str(hub.get("commit") or "")
            return f"{self.format_name} from {hub['id']}" + (f" (commit {commit[:12]})" if commit else "")
        if "random_init" in self.origin:
            seed = self.origin["random_init"].get("seed") if isinstance(self.origin["random_init"], dict) else None
            return "random initialisation" + (f" (seed {seed})" if seed is not None else "")
        if self.format == "random":
            return "random initialisation"
        return f"{self.format} file {self.source}"

    def summary(self) -> str:
        """`demo_tiny: 0.9 M params, 64 px, pretrained with preset demo_tiny, 600 iterations`."""
        return (f"{self.name or 'unnamed'}: {format_params(self.num_params)} params, {self.input_size} px, "
                f"{self.provenance()}")

    def describe(self) -> dict[str, Any]:
        """JSON-safe identity for APIs, run records and features files (no tensors)."""
        return {
            "name": self.name or None,
            "num_params": self.num_params,
            "input_size": self.input_size,
            "source": self.source,
            "format": self.format,
            "format_name": self.format_name,
            "provenance": self.provenance(),
            "config_source": self.config_source,
            "weights_sha256": self.weights_sha256,
            **({"hub": dict(self.origin["hub"])} if isinstance(self.origin.get("hub"), dict) else {}),
        }

    def file_extra(self) -> dict[str, Any]:
        """Provenance to write back into our file format (so a re-saved model keeps where it came from)."""
        return dict(self.origin)

    def to_meta(self) -> dict[str, Any]:
        """The untyped dict `load_backbone` used to return (kept for its deprecated callers)."""
        return {
            **self.origin,
            "kind": "backbone",
            "name": self.name,
            "format": self.format,
            "source": self.source,
            "config": self.config.to_dict(),
            "config_source": self.config_source,
            "transform": self.transform.to_dict(),
            "weights_sha256": self.weights_sha256,
            "heads": self.heads,
            "ignored": list(self.ignored),
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "source_dtypes": list(self.source_dtypes),
            "converted_from": self.origin.get("source"),
        }


def format_params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n / 1e3:.1f} k"


def origin_from_file_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The provenance entries of one of our backbone files' metadata."""
    return {k: v for k, v in meta.items() if k not in _FILE_KEYS}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def attach_info(model: nn.Module, info: ModelInfo) -> nn.Module:
    if not info.num_params:
        info.num_params = count_params(model)
    model.info = info  # type: ignore[assignment]  # a plain attribute (not a buffer): deepcopy keeps it
    return model


def info_of(model: nn.Module) -> ModelInfo:
    """The model's `ModelInfo`; for a model built directly (no resolver), one describing it as in memory."""
    info = getattr(model, "info", None)
    if isinstance(info, ModelInfo):
        return info
    from chexfound.data.transform import InputTransform
    from chexfound.models.format import state_dict_sha256

    cfg: ViTConfig = model.cfg  # type: ignore[assignment]
    return ModelInfo(name=cfg.name, config=cfg, transform=InputTransform.for_backbone(cfg),
                     weights_sha256=state_dict_sha256(model.state_dict()), source="in memory", format="module",
                     config_source="the model's config", num_params=count_params(model))
