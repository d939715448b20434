"""The response models of the HTTP API (they make /openapi.json say what clients get)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class FindingOut(BaseModel):
    name: str
    probability: float
    calibration: str | None = Field(None, description="the post-hoc calibrator behind the probability: none | "
                                                       "temperature | platt | isotonic (absent: not recorded)")
    threshold: float | None = Field(None, description="absent when the finding has no threshold (no call)")
    positive: bool | None = Field(None, description="probability >= threshold; absent when no call is made "
                                                    "(uninformative finding or head, no threshold, regression)")
    threshold_rule: str | None = Field(None, description="how the threshold was chosen: f1 | youden | prevalence "
                                                         "| none | default | unrecorded")
    threshold_reason: str | None = Field(None, description="why that rule (validation evidence)")
    informative: bool | None = Field(None, description="false: the head cannot tell images apart for this "
                                                       "finding (chexfound.stats.informative); absent: not judged")
    uninformative_reason: str | None = None
    heatmap_url: str | None = None
    heatmap_png: str | None = Field(None, description="base64 PNG overlay (heatmaps=base64, top-k findings)")


class HeatmapInfo(BaseModel):
    available: bool
    reason: str | None = None
    kind: str | None = Field(None, description="what the maps show: glori_attention | "
                                               "linear_patch_contribution | cls_attention")
    description: str | None = None


class ImageOut(BaseModel):
    filename: str | None
    bytes: int
    source_format: str | None = None
    original_size: list[int] | None = None
    photometric_interpretation: str | None = None
    view_position: str | None = None
    image_url: str | None = None
    warnings: list[str] | None = Field(None, description="what the reader doubts about the file (e.g. a "
                                                         "MONOCHROME1 header over pixels that look inverted)")


class PredictionOut(BaseModel):
    id: str | None = Field(None, description="key of the cached image/heatmaps (heatmaps=url)")
    findings: list[FindingOut] = Field(description="one entry per finding, in the head's order")
    positive: list[str]
    uninformative: str | None = Field(None, description="set when the head as a whole is uninformative: why "
                                                        "(no finding is called)")
    model: dict[str, Any]
    image: ImageOut
    heatmaps: HeatmapInfo
    timing_ms: dict[str, float]


class ErrorOut(BaseModel):
    detail: str = Field(description="what went wrong, naming the upload")
    kind: str | None = Field(None, description="for unreadable uploads, why: truncated, undecodable, "
                                               "not_an_image, too_large, ... (chexfound.io.ReadFailure)")
