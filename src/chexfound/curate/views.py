"""View positions (PA, AP, lateral...) as the public datasets spell them, and the view filter's vocabulary.

Used by the corpus spec (to validate `filters.views`) and by the filters (to apply it); kept apart from both so
neither imports the other.
"""

from __future__ import annotations

import math
import re
from typing import Any

# View codes as the public datasets write them (MIMIC ViewPosition, CheXpert, PadChest Projection, NIH).
_FRONTAL = {"PA", "AP", "AP AXIAL", "AP SUPINE", "AP LLD", "AP RLD", "PA LLD", "PA RLD", "AP HORIZONTAL",
            "AP_HORIZONTAL", "FRONTAL", "POSTEROANTERIOR", "ANTEROPOSTERIOR", "PA/AP", "AP/PA"}
_LATERAL = {"LATERAL", "LL", "RL", "L", "LAT", "LEFT LATERAL", "RIGHT LATERAL", "XTABLE LATERAL"}
VIEW_PRESETS = {"frontal": {"frontal"}, "lateral": {"lateral"}, "frontal+lateral": {"frontal", "lateral"}}


def view_category(raw: Any) -> str | None:
    """'frontal' | 'lateral' | 'other', or None when unknown."""
    code = normalize_view(raw)
    if code is None:
        return None
    if code in _FRONTAL:
        return "frontal"
    if code in _LATERAL:
        return "lateral"
    return "other"


def normalize_view(raw: Any) -> str | None:
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return None
    s = re.sub(r"\s+", " ", str(raw).strip().upper().replace("-", " "))
    return s or None


def parse_views(views: str | list[str] | None) -> set[str] | None:
    """Allowed view categories/codes, or None for no view filter."""
    if views is None:
        return None
    if isinstance(views, str):
        key = views.strip().lower()
        if key in ("all", "any", ""):
            return None
        if key not in VIEW_PRESETS:
            raise ValueError(f"unknown view preset {views!r}; use one of {sorted(VIEW_PRESETS)}, 'all' or a list")
        return set(VIEW_PRESETS[key])
    out = set()
    for v in views:
        key = str(v).strip().lower()
        out |= VIEW_PRESETS.get(key, {normalize_view(v) or ""})
    return out


def view_allowed(raw: Any, allowed: set[str] | None, keep_unknown: bool) -> bool:
    if allowed is None:
        return True
    code = normalize_view(raw)
    if code is None:
        return keep_unknown
    return code in allowed or view_category(code) in allowed
