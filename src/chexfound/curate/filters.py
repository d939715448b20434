"""Metadata filters. Each item gets the name of the first rule it fails ("" if it passes), so every
removal is counted per source and per rule in the report.

Pre-decode rules read the manifest columns (view, modality, age, the patient exclusion list); post-decode
rules need the pixels or the file header (size, blank images, and view/modality from a DICOM header when
the manifest had none).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import numpy as np
import pandas as pd

from chexfound.curate.spec import FilterSpec
from chexfound.curate.views import normalize_view, parse_views, view_allowed

RULES_PRE = ("excluded_patient", "view", "modality", "age")
RULES_POST = ("blank", "min_size", "max_size", "view", "modality", "age")


def parse_age(x: Any) -> float:
    """Years as a float (NaN when unknown): numbers, DICOM AgeString ('045Y', '006M', '003W', '010D')."""
    if x is None:
        return math.nan
    if isinstance(x, (int, float, np.integer, np.floating)):
        v = float(x)
        return v if math.isfinite(v) and v >= 0 else math.nan
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([YMWDymwd]?)\s*", str(x))
    if not m:
        return math.nan
    v = float(m.group(1))
    return v / {"": 1, "Y": 1, "M": 12, "W": 52.1775, "D": 365.25}[m.group(2).upper()]


def _norm_modality(x: Any) -> str | None:
    if x is None or (isinstance(x, float) and math.isnan(x)) or not str(x).strip():
        return None
    return str(x).strip().upper()


def norm_patient(x: Any) -> str:
    """Patient ids compare as strings; purely numeric ids ignore leading zeros and '.0' (147 == 00000147)."""
    s = str(x).strip()
    if re.fullmatch(r"\d+(\.0+)?", s):
        return str(int(float(s)))
    return s


def exclusion_mask(items: pd.DataFrame, exclude: pd.DataFrame | None) -> np.ndarray:
    """True where the item's patient is listed. `exclude` has patient_id (or patient_key) and optionally
    source, which may name a source or a patient namespace; without it an id matches in every source.
    Ids already in our "<namespace>:<id>" form (e.g. a curated manifest used as the list) match as well."""
    if exclude is None or not len(items):
        return np.zeros(len(items), dtype=bool)
    pats = items["patient_raw"].map(norm_patient)
    ids = exclude["patient_id"].map(norm_patient)
    full_ids = set(exclude["patient_id"].astype(str).str.strip())
    full = np.array([f"{ns}:{p}" in full_ids for ns, p in zip(items["namespace"], items["patient_raw"])], dtype=bool)
    if "source" in exclude.columns:
        listed = set(zip(exclude["source"].astype(str).str.strip(), ids))
        by_name = [(s, p) in listed for s, p in zip(items["source"], pats)]
        by_ns = [(s, p) in listed for s, p in zip(items["namespace"], pats)]
        return np.array(by_name, dtype=bool) | np.array(by_ns, dtype=bool) | full
    return pats.isin(set(ids)).to_numpy() | full


def _age_bad(age: float, f: FilterSpec) -> bool:
    return (f.min_age is not None and age < f.min_age) or (f.max_age is not None and age > f.max_age)


def pre_filter(items: pd.DataFrame, f: FilterSpec, exclude: pd.DataFrame | None) -> np.ndarray:
    """The first failing pre-decode rule per item ('' = passes).

    Only *known* values are judged here; an unknown view/modality/age may still come from the file header,
    so `post_filter` decides those (and applies the keep_unknown_* settings).
    """
    rule = np.full(len(items), "", dtype=object)
    allowed = parse_views(f.views)
    mods = {m.upper() for m in f.modalities} if f.modalities else None

    def mark(mask: Iterable[bool], name: str) -> None:
        m = np.asarray(list(mask), dtype=bool) & (rule == "")
        rule[m] = name

    mark(exclusion_mask(items, exclude), "excluded_patient")
    mark((not view_allowed(v, allowed, True) for v in items["view"]), "view")
    if mods is not None:
        mark(((m := _norm_modality(x)) is not None and m not in mods for x in items["modality"]), "modality")
    mark((_age_bad(parse_age(a), f) for a in items["age"]), "age")
    return rule


def post_filter(rec: dict[str, Any], f: FilterSpec, item: dict[str, Any]) -> str:
    """The first failing post-decode rule for one processed record ('' = passes).

    `item` is the item's manifest metadata (view, modality, age); the header's values fill the gaps.
    """
    if f.drop_blank and rec.get("blank"):
        return "blank"
    w, h = int(rec["orig_width"]), int(rec["orig_height"])
    if f.min_size is not None and min(w, h) < f.min_size:
        return "min_size"
    if f.max_size is not None and max(w, h) > f.max_size:
        return "max_size"
    view = item.get("view") if normalize_view(item.get("view")) is not None else rec.get("view_position")
    if not view_allowed(view, parse_views(f.views), f.keep_unknown_view):
        return "view"
    if f.modalities:
        m = _norm_modality(item.get("modality")) or _norm_modality(rec.get("modality"))
        allowed_mods = {x.upper() for x in f.modalities}
        if (m is None and not f.keep_unknown_modality) or (m is not None and m not in allowed_mods):
            return "modality"
    if f.min_age is not None or f.max_age is not None:
        age = parse_age(item.get("age"))
        if math.isnan(age):
            age = parse_age(rec.get("patient_age"))
        if (math.isnan(age) and not f.keep_unknown_age) or (not math.isnan(age) and _age_bad(age, f)):
            return "age"
    return ""
