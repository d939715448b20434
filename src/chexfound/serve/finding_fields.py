"""The fields of one per-finding prediction record (`Prediction.findings_list()`) as the reports we write name
them: a DICOM SR content item, a FHIR Observation component.

`FIELDS` is the one table: a new field of the record gets one line here and appears in the SR and in FHIR.
A field not listed is still written, typed by its value (number, flag or text) under a code in our private
scheme (`CODING_SCHEME`), so nothing the record says is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal

Kind = Literal["number", "flag", "text"]

# Private coding scheme for concepts DICOM/SNOMED do not name (DICOM PS3.16 8.2: designators starting "99").
CODING_SCHEME = "99CHEXFOUND"
SCHEME_NAME = "chexfound output fields"


@dataclass(frozen=True)
class Field:
    """How one record field is reported. `code` (scheme, value, meaning) when a standard concept fits;
    `presence`: a flag that says whether the finding itself is present (SR: the finding coded Present/Absent)."""

    kind: Kind
    meaning: str
    code: tuple[str, str, str] | None = None
    presence: bool = False

    def coded(self, key: str) -> tuple[str, str, str]:
        return self.code or (CODING_SCHEME, key, self.meaning)


FIELDS: dict[str, Field] = {
    "probability": Field("number", "Probability", ("DCM", "122157", "Probability")),
    "positive": Field("flag", "Called positive at the decision threshold", presence=True),
    "threshold": Field("number", "Decision threshold"),
    "threshold_rule": Field("text", "Rule that chose the decision threshold"),
    "threshold_reason": Field("text", "Evidence behind the decision threshold"),
}
SKIP = ("name", "heatmap_url", "heatmap_png")  # the finding itself; links that only mean something to the page


def field_of(key: str, value: Any) -> Field | None:
    """The Field for `key`: from FIELDS, else typed by `value` (None for values with no report form)."""
    if key in FIELDS:
        return FIELDS[key]
    meaning = key.replace("_", " ").capitalize()
    if isinstance(value, bool):
        return Field("flag", meaning)
    if isinstance(value, (int, float)):
        return Field("number", meaning)
    if isinstance(value, str):
        return Field("text", meaning)
    return None


def record_fields(record: dict[str, Any]) -> Iterator[tuple[str, Field, Any]]:
    """(key, Field, value) for every reportable field of one finding record with a value (None = not stated)."""
    for key, value in record.items():
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
            value = value.item()  # numpy scalars as the Python number or bool they hold
        if key in SKIP or value is None:
            continue
        f = field_of(key, value)
        if f is not None:
            yield key, f, value
