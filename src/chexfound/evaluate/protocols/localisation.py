"""Protocol (d): does the model look at the right place? Attention heatmaps against expert boxes.

Heatmaps come from a callable `heatmap_fn(x[B, 3, S, S]) -> [B, K, S, S]`: K = number of findings for heads
with one attention map per finding (GLoRI's cross-attention), or K = 1 for a class-agnostic map (the
backbone's last-block CLS attention, used with probes that have no spatial attention). Boxes are mapped into
the model-input frame through the same geometry as the image (`map_boxes`), then scored with the pointing
game and the attention mass inside boxes, against a centre-prior and a uniform baseline (localisation.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from chexfound.data.transform import InputTransform
from chexfound.errors import ChexfoundError
from chexfound.adapt.forward import head_forward
from chexfound.adapt.heatmap import attention_map
from chexfound.evaluate.box_scores import LocalisationItem, map_boxes, pointing_hit, score_items, summarise
from chexfound.io import read_image

log = logging.getLogger(__name__)

HeatmapFn = Callable[[torch.Tensor], np.ndarray]


def _upsample(weights: torch.Tensor, size: int, gamma: float | None) -> np.ndarray:
    """[heads, N] attention -> [S, S] map (heads averaged, bilinear). Not normalised: the attention mass in
    boxes is a share of the raw attention."""
    return attention_map(weights, size=size, gamma=1.0 if gamma is None else gamma, normalize=False)


def cls_attention_heatmaps(backbone: torch.nn.Module, gamma: float | None = None) -> HeatmapFn:
    """Class-agnostic maps: last block's attention from CLS to the patch tokens (heads averaged)."""

    @torch.no_grad()
    def fn(x: torch.Tensor) -> np.ndarray:
        dev = next(backbone.parameters()).device
        out = backbone.forward_features(x.to(dev), return_attention=True)
        attn = out["attention"]  # [B, heads, T, T]
        r = backbone.num_register_tokens
        cls_to_patch = attn[:, :, 0, 1 + r:].float().cpu()
        s = x.shape[-1]
        return np.stack([_upsample(a, s, gamma)[None] for a in cls_to_patch])

    return fn


def head_attention_heatmaps(backbone: torch.nn.Module, head: Any, gamma: float | None = None) -> HeatmapFn:
    """Per-finding maps from a head that returns attention [B, heads, C, N] (e.g. GLoRI).

    `gamma` (the original notebook's 0.5) is for display only: scores should use the raw attention (None),
    since the share of attention mass inside a box is not preserved by a power."""

    @torch.no_grad()
    def fn(x: torch.Tensor) -> np.ndarray:
        dev = next(backbone.parameters()).device
        attn = head_forward(backbone, head, x.to(dev)).attention
        if attn is None:
            raise ChexfoundError(f"head {type(head).__name__} returns no attention maps")
        s = x.shape[-1]
        a = attn.float().cpu()
        return np.stack([np.stack([_upsample(a[b, :, c], s, gamma) for c in range(a.shape[2])])
                         for b in range(a.shape[0])])

    return fn


@dataclass
class GalleryItem:
    image: np.ndarray      # [S, S] model-input geometry, [0, 1]
    heatmap: np.ndarray    # [S, S]
    boxes: np.ndarray      # [K, 4] xyxy in the same frame
    title: str
    hit: bool


def collect_items(
    paths: Sequence[Path],
    image_ids: Sequence[str],
    patients: Sequence[str],
    boxes: pd.DataFrame,
    findings: Sequence[str],
    transform: InputTransform,
    heatmap_fn: HeatmapFn,
    batch_size: int = 16,
    gallery: int = 12,
    tolerance: float = 0.0,
    sigma_frac: float = 0.25,
) -> tuple[pd.DataFrame, list[GalleryItem], list[tuple[str, str]]]:
    """Score the heatmap of every image that has boxes of a task finding.

    Returns one row per (image, finding) (see `score_items`), a gallery sample and unreadable files."""
    by_image = {k: g for k, g in boxes[boxes["finding"].isin(list(findings))].groupby("image_id")}
    todo = [(Path(p), str(i), str(q)) for p, i, q in zip(paths, image_ids, patients) if str(i) in by_image]
    scores: list[pd.DataFrame] = []
    shown: list[GalleryItem] = []
    errors: list[tuple[str, str]] = []
    s = transform.size
    n_f = max(1, len({f for g in by_image.values() for f in g["finding"]}))
    per_finding = max(1, -(-gallery // n_f))
    per_finding_shown: dict[str, int] = {}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        xs, metas = [], []
        for p, iid, pid in chunk:
            try:
                img = read_image(p)
            except Exception as e:  # noqa: BLE001 - a bad file is listed and skipped, as in every batch job
                errors.append((str(p), str(e)))
                continue
            xs.append(transform(img.pixels))
            metas.append((p, iid, pid, img.pixels.shape, transform.geometry(img.pixels).numpy()))
        if not xs:
            continue
        maps = heatmap_fn(torch.stack(xs))
        for b, (p, iid, pid, hw, geom) in enumerate(metas):
            for f, g in by_image[iid].groupby("finding", sort=True):
                k = list(findings).index(f) if maps.shape[1] > 1 else 0
                bx = map_boxes(g[["x", "y", "w", "h"]].to_numpy(), hw[:2], s, transform.mode)
                keep = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])  # boxes cropped away entirely are dropped
                if not keep.any():
                    continue
                it = LocalisationItem(iid, pid, str(f), maps[b, k], bx[keep])
                # Score now and keep only the numbers: S x S maps for every box image would not fit in memory.
                scores.append(score_items([it], tolerance, sigma_frac))
                # A few examples per finding for the report's gallery (kept while the image is at hand).
                if len(shown) < gallery and per_finding_shown.get(it.finding, 0) < per_finding:
                    per_finding_shown[it.finding] = per_finding_shown.get(it.finding, 0) + 1
                    shown.append(GalleryItem(geom, it.heatmap, it.boxes, f"{it.finding} ({iid})",
                                             pointing_hit(it.heatmap, it.boxes, tolerance)))
    table = pd.concat(scores, ignore_index=True) if scores else score_items([])
    return table, shown, errors


def run_localisation(scores: pd.DataFrame, heatmap_source: str, tolerance: float = 0.0,
                     n_boot: int = 1000, seed: int = 0, sigma_frac: float = 0.25) -> dict[str, Any]:
    """Summaries (per finding and overall, patient-level CIs) of the rows from `collect_items`."""
    if not len(scores):
        raise ChexfoundError("localisation: no image in the chosen split has a box for any task finding")
    summ = summarise(scores, n_boot=n_boot, seed=seed)
    return {"heatmap_source": heatmap_source, "tolerance_px": tolerance, "centre_prior_sigma": sigma_frac,
            "frame": "model input (S x S after the input transform geometry)", **summ,
            "items": scores.to_dict(orient="records")}
