"""Resumable stages: each finished stage leaves `stages/<name>.json`; a rerun loads it instead of redoing it."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from chexfound.runio import atomic_write_json

log = logging.getLogger(__name__)


class StageRunner:
    def __init__(self, out: Path, echo: Callable[[str], None] = print) -> None:
        self.dir = out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.timings: dict[str, float] = {}

    def done(self, name: str) -> bool:
        return (self.dir / f"{name}.json").is_file()

    def run(self, name: str, title: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.dir / f"{name}.json"
        if path.is_file():
            self.echo(f"[{name}] already done (rerun skips it; delete {path} to redo)")
            res = json.loads(path.read_text())
            self.timings[name] = float(res.pop("_seconds", 0.0))
            return res
        self.echo(f"[{name}] {title}")
        t0 = time.perf_counter()
        res = fn()
        self.timings[name] = round(time.perf_counter() - t0, 1)
        atomic_write_json(path, {**res, "_seconds": self.timings[name]}, indent=1)
        self.echo(f"[{name}] done in {self.timings[name]:.0f} s")
        return res
