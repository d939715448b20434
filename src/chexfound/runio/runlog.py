"""The run log: `metrics.jsonl` in a run folder, one JSON object per line, appended as the run goes.

Every row has `kind` (what the row is: "train", "probe", "event", ...) and `time` (ISO-8601 UTC, the one time
format of the project); the rest are the caller's fields, made JSON-safe (NaN -> null). Rows are flushed as
they are written, so `tail -f` and a crash both see every finished row. A run killed mid-line leaves a torn
last line: readers skip it, and the next row starts on a fresh line.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from os import PathLike
from pathlib import Path
from typing import Any

from chexfound.runio.atomic import atomic_write_text
from chexfound.runio.jsonsafe import json_safe

__all__ = ["RunLog", "read_jsonl", "utc_now"]


def utc_now() -> str:
    """Now as ISO-8601 UTC with milliseconds, e.g. 2026-11-30T09:15:02.123+00:00 (datetime.fromisoformat
    reads it back)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def read_jsonl(path: str | PathLike[str]) -> list[dict[str, Any]]:
    """Every row of a JSON-lines file; [] when it does not exist. A torn line (a run killed while writing it)
    is skipped wherever it is; a line that is not a JSON object at all raises ValueError naming the file and
    the line."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()  # a cut may split a character
    rows = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if line.startswith("{"):
                continue  # a row cut short by a kill: at the end, or before the row a resumed run wrote
            raise ValueError(f"{p}: line {n} is not JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{p}: line {n} is not a JSON object")
        rows.append(row)
    return rows


class RunLog:
    """The one metrics.jsonl writer. `enabled=False` (ranks other than 0 under torchrun) makes every call a
    no-op, so callers need no `if rank == 0` around logging."""

    def __init__(self, path: str | PathLike[str], enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._checked_tail = False

    def write(self, kind: str, **fields: Any) -> dict[str, Any] | None:
        """Append one row {kind, time, **fields}; returns the row as written (None when disabled)."""
        if not self.enabled:
            return None
        if "kind" in fields or "time" in fields:
            raise TypeError("RunLog.write: 'kind' and 'time' are set by the log, not passed as fields")
        row = json_safe({"kind": kind, "time": utc_now(), **fields})
        line = json.dumps(row, allow_nan=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            if not self._checked_tail:
                line = self._after_torn_line(f) + line
                self._checked_tail = True
            f.write(line.encode("utf-8"))
            f.flush()
        return row

    @staticmethod
    def _after_torn_line(f: Any) -> str:
        # A previous run killed mid-line left no newline at the end: start this row on a line of its own.
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return ""
        f.seek(-1, os.SEEK_END)
        return "" if f.read(1) == b"\n" else "\n"

    def rows(self) -> list[dict[str, Any]]:
        """Every row logged so far (a torn last line is skipped)."""
        return read_jsonl(self.path)

    def truncate_after(self, iteration: int) -> None:
        """Resume from a checkpoint at `iteration`: drop rows logged past it (they belong to the lost part of
        the run and are about to be logged again) and any torn line. Rows without an iteration stay."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_jsonl(self.path) if _iteration(r) <= iteration]
        atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in keep))
        self._checked_tail = True  # the rewrite ends with a newline

    def clear(self) -> None:
        """Start the log afresh (a new run in a folder that holds no checkpoint)."""
        if self.enabled:
            self.path.unlink(missing_ok=True)
            self._checked_tail = True


def _iteration(row: dict[str, Any]) -> float:
    it = row.get("iteration")
    return it if isinstance(it, (int, float)) and not isinstance(it, bool) else float("-inf")
