"""The one list of inputs a batch command could not use: `skipped.csv`, columns stage, index, path, reason.

    stage    which step skipped it (pretrain, embed, train, val, evaluate, predict, dicom-out, info...)
    index    the input's position in what the command was given (empty when the step has no order)
    path     the file as given
    reason   why, in words (the reader's message without the path)

Every command writes it through `write_skipped` (atomically; removed when nothing was skipped, so a rerun that
read everything leaves no stale list) or, for a build that must keep its list across an interruption,
`append_skipped`. `read_skipped` reads it back, and also the layouts older runs wrote: `skipped.txt` (path TAB
reason), CSVs of (path, reason), (index, path, reason), (split, path, reason), and `errors.jsonl` (row, path,
error), so a report over old run folders still lists what they skipped.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from chexfound.runio.atomic import atomic_write_bytes

__all__ = ["SKIPPED_COLUMNS", "SKIPPED_FILE", "SkippedInput", "append_skipped", "find_skipped", "read_skipped",
           "skipped_rows", "write_skipped"]

SKIPPED_FILE = "skipped.csv"
SKIPPED_COLUMNS = ("stage", "index", "path", "reason")
_LEGACY_NAMES = ("skipped.txt", "errors.jsonl")


@dataclass(frozen=True)
class SkippedInput:
    """One input a command could not use."""

    stage: str
    index: int | None
    path: str
    reason: str

    def row(self) -> list[str]:
        """The CSV row: stage, index, path, reason."""
        return [self.stage, "" if self.index is None else str(int(self.index)), self.path, self.reason]


def skipped_rows(stage: str, items: Iterable[Sequence[object]]) -> list[SkippedInput]:
    """(index, path, reason) or (path, reason) tuples of one stage -> SkippedInput rows."""
    out = []
    for it in items:
        if isinstance(it, SkippedInput):
            out.append(it)
        elif len(it) == 3:
            i, p, r = it
            out.append(SkippedInput(stage, None if i is None or i == "" else int(str(i)), str(p), str(r)))
        elif len(it) == 2:
            p, r = it
            out.append(SkippedInput(stage, None, str(p), str(r)))
        else:
            raise ValueError(f"a skipped input is (index, path, reason) or (path, reason), got {it!r}")
    return out


def _csv_text(rows: Iterable[SkippedInput], header: bool) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(SKIPPED_COLUMNS)
    w.writerows(r.row() for r in rows)
    return buf.getvalue()


def write_skipped(path: str | PathLike[str], rows: Iterable[SkippedInput]) -> Path | None:
    """Write `rows` to `path` (a `skipped.csv`, or `<name>.skipped.csv` beside a single output file) atomically;
    with no rows, remove `path` and return None."""
    target = Path(path)
    rows = list(rows)
    if not rows:
        target.unlink(missing_ok=True)
        return None
    return atomic_write_bytes(target, _csv_text(rows, header=True).encode())


def append_skipped(path: str | PathLike[str], rows: Iterable[SkippedInput]) -> Path:
    """Add `rows` to `path` as they happen (header written first when the file is new), flushed, so an
    interrupted build keeps what it skipped. A torn last line (a crash mid-write) is ended first."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    new = not target.is_file() or target.stat().st_size == 0
    with open(target, "a+b") as f:
        if not new:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(_csv_text(rows, header=new).encode())
        f.flush()
    return target


def find_skipped(folder: str | PathLike[str]) -> Path | None:
    """The skipped list of a run folder: `skipped.csv`, else an older run's `skipped.txt` / `errors.jsonl`."""
    for name in (SKIPPED_FILE, *_LEGACY_NAMES):
        p = Path(folder) / name
        if p.is_file():
            return p
    return None


def _int_or_none(s: object) -> int | None:
    try:
        return int(str(s))
    except ValueError:
        return None


def read_skipped(path: str | PathLike[str], stage: str = "") -> list[SkippedInput]:
    """The rows of a skipped list in any layout this project has written (see the module docstring); `stage`
    fills the stage of layouts that had none. A missing file is an empty list."""
    p = Path(path)
    if not p.is_file():
        return []
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        out = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a torn last line of an interrupted build
                continue
            out.append(SkippedInput(stage, _int_or_none(rec.get("row", "")), str(rec["path"]),
                                    str(rec.get("error", rec.get("reason", "")))))
        return out
    if p.suffix == ".txt":
        return [SkippedInput(stage, None, *line.split("\t", 1)) for line in text.splitlines() if "\t" in line]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    head, body = rows[0], [r for r in rows[1:] if r]
    if tuple(head) == SKIPPED_COLUMNS:
        return [SkippedInput(s, _int_or_none(i) if i != "" else None, pth, r) for s, i, pth, r in
                (row for row in body if len(row) == 4)]
    if head == ["path", "reason"]:
        return [SkippedInput(stage, None, a, b) for a, b in (r for r in body if len(r) == 2)]
    if head == ["index", "path", "reason"]:
        return [SkippedInput(stage, _int_or_none(a), b, c) for a, b, c in (r for r in body if len(r) == 3)]
    if head == ["split", "path", "reason"]:
        return [SkippedInput(a or stage, None, b, c) for a, b, c in (r for r in body if len(r) == 3)]
    raise ValueError(f"{p}: not a skipped-inputs list (header {head!r}; expected {','.join(SKIPPED_COLUMNS)})")
