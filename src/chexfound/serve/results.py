"""Where `chexfound predict` keeps its results: resumable while running, written atomically at the end.

Files next to `--out preds.csv` (or `preds.json`):
    .preds.csv.partial   rows appended batch by batch while running (path + one probability per finding)
    preds.run.json       the model identity, settings and counts (checked on resume: same model or refuse), and
                         per finding the threshold, its rule, the calibrator and the informative verdict
                         (`finding_policy`: what `evaluate --predictions` scores calls with)
    preds.skipped.csv    files that could not be read, and why (only when there are any)
A rerun with the same --out skips every path already in the partial or final file and appends new ones.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chexfound.errors import ChexfoundError
from chexfound.runio import atomic_write_bytes, skipped_rows, write_skipped
from chexfound.serve.overlay import read_overlay_index
from chexfound.serve.prediction import HeadReliability, Prediction, finding_records

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") or "x"


def heatmap_folder(path: str | Path) -> str:
    """One folder per image: its stem + a hash of its absolute path (two `1.dcm` in different folders differ)."""
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
    return f"{safe_name(Path(path).stem)}-{digest}"


def _fmt(v: float) -> str:
    return f"{float(v):.7g}"


class PredictionStore:
    def __init__(self, out: Path, findings: Sequence[str], thresholds: np.ndarray, task: str,
                 identity: dict[str, Any], heatmap_dir: Path | None = None,
                 threshold_rules: Sequence[dict[str, str]] | None = None,
                 reliability: HeadReliability | None = None, heatmap_kind: str | None = None) -> None:
        self.out = out
        self.heatmap_kind = heatmap_kind  # what the heatmaps show (chexfound.adapt.attribution)
        self.reliability = reliability or HeadReliability.unknown(len(findings))
        self.threshold_rules = list(threshold_rules or [{} for _ in findings])
        self.fmt = "json" if out.suffix.lower() == ".json" else "csv"
        self.findings = list(findings)
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.task = task
        self.identity = identity
        self.heatmap_dir = heatmap_dir
        self.partial = out.with_name(f".{out.name}.partial")
        self.run_file = out.with_name(f"{out.stem}.run.json")
        self.skipped_file = out.with_name(f"{out.stem}.skipped.csv")
        self.rows: dict[str, tuple[str, np.ndarray]] = {}  # abspath -> (path as given, probabilities)
        # Findings that get no call (no threshold, or uninformative): a trailing CSV column names them per row.
        probe = finding_records(self.findings, np.zeros(len(self.findings)), self.thresholds, task,
                                self.threshold_rules, self.reliability)
        self.no_call = [r["name"] for r in probe if r["positive"] is None] if task in ("multilabel", "binary",
                                                                                      "multiclass") else []
        self.columns = ["path", *self.findings] + (["no_call"] if self.no_call else [])
        self.resumed = 0

    # -- resume --
    def load(self) -> int:
        """Read earlier results for this --out (refusing ones made by another model); returns how many."""
        if self.run_file.is_file():
            try:
                previous = json.loads(self.run_file.read_text()).get("identity", {})
            except (OSError, json.JSONDecodeError) as e:
                raise ChexfoundError(f"{self.run_file}: unreadable run record ({e}); delete it to start over") from e
            diff = [k for k in self.identity if previous.get(k) != self.identity[k]]
            if diff:
                raise ChexfoundError(
                    f"{self.out}: earlier results were made with a different model ({', '.join(diff)} differ); "
                    "choose another --out or delete the old results")
        if self.out.is_file():
            self._load_final()
        if self.partial.is_file():
            self._load_csv(self.partial)
        self.resumed = len(self.rows)
        return self.resumed

    def _check_header(self, header: list[str], source: Path) -> None:
        if header not in (["path", *self.findings], ["path", *self.findings, "no_call"]):
            raise ChexfoundError(f"{source}: its columns {header[:4]}... are not path + this head's findings; "
                                 "choose another --out or delete it")

    def _load_csv(self, path: Path) -> None:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            self._check_header(header, path)
            for row in reader:
                if len(row) != len(header):  # a row cut short by an interruption: redo that image
                    continue
                try:
                    probs = np.array([float(v) for v in row[1 : 1 + len(self.findings)]], dtype=np.float32)
                except ValueError:
                    continue
                self.rows[os.path.abspath(row[0])] = (row[0], probs)

    def _load_final(self) -> None:
        if self.fmt == "csv":
            self._load_csv(self.out)
            return
        try:
            data = json.loads(self.out.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ChexfoundError(f"{self.out}: not readable as earlier predictions ({e})") from e
        for rec in data.get("predictions", []):
            names = [f["name"] for f in rec["findings"]]
            if names != self.findings:
                self._check_header(["path", *names], self.out)
            probs = np.array([f["probability"] for f in rec["findings"]], dtype=np.float32)
            self.rows[os.path.abspath(rec["path"])] = (rec["path"], probs)

    def done(self, path: str | Path) -> bool:
        return os.path.abspath(path) in self.rows

    # -- while running --
    def start(self, settings: dict[str, Any]) -> None:
        self._write_run({"status": "running", "identity": self.identity, "settings": settings,
                         "finding_policy": self.finding_policy()})

    def append(self, preds: Sequence[Prediction]) -> None:
        good = [p for p in preds if p.ok and p.path is not None]
        if not good:
            return
        buf = io.StringIO()
        w = csv.writer(buf)
        new = not self.partial.exists() or self.partial.stat().st_size == 0
        if new:
            w.writerow(self.columns)
        for p in good:
            assert p.probabilities is not None and p.path is not None
            w.writerow([p.path, *map(_fmt, p.probabilities)] + self._no_call_cell())
            self.rows[os.path.abspath(p.path)] = (p.path, p.probabilities.astype(np.float32))
        with open(self.partial, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())

    # -- the end --
    def _heatmaps_of(self, path: str) -> dict[str, str]:
        if self.heatmap_dir is None:
            return {}
        return read_overlay_index(self.heatmap_dir / heatmap_folder(path))

    def _no_call_cell(self) -> list[str]:
        return [";".join(self.no_call)] if self.no_call else []

    def records(self) -> list[dict[str, Any]]:
        out = []
        for shown, probs in self.rows.values():
            recs = finding_records(self.findings, probs, self.thresholds, self.task, self.threshold_rules,
                                   self.reliability)
            rec: dict[str, Any] = {"path": shown, "findings": recs,
                                   "positive": [r["name"] for r in recs if r["positive"] is True]}
            maps = self._heatmaps_of(shown)
            if maps:
                rec["heatmaps"] = maps
                rec["heatmap_kind"] = self.heatmap_kind
            out.append(rec)
        return out

    def finding_policy(self) -> dict[str, Any]:
        """What turns this file's probabilities into calls: per finding the threshold (None: no call), its rule,
        the calibrator and the informative verdict, and the verdict on the head as a whole."""
        recs = finding_records(self.findings, np.zeros(len(self.findings)), self.thresholds, self.task,
                               self.threshold_rules, self.reliability)
        return {"findings": [{k: v for k, v in r.items() if k not in ("probability", "positive")}
                             | {"called": r["name"] not in self.no_call} for r in recs],
                "thresholds": {r["name"]: r["threshold"] for r in recs},
                "head": self.reliability.to_dict(self.findings)}

    def finish(self, skipped: Sequence[tuple[str, str]], model: dict[str, Any], settings: dict[str, Any]) -> None:
        if self.fmt == "csv":
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(self.columns)
            for shown, probs in self.rows.values():
                w.writerow([shown, *map(_fmt, probs)] + self._no_call_cell())
            atomic_write_bytes(self.out, buf.getvalue().encode())
        else:
            doc = {"model": model, "predictions": self.records(),
                   "skipped": [{"path": p, "reason": r} for p, r in skipped]}
            atomic_write_bytes(self.out, json.dumps(doc, indent=1).encode())
        write_skipped(self.skipped_file, skipped_rows("predict", skipped))  # removed when nothing was skipped
        self._write_run({"status": "complete", "identity": self.identity, "settings": settings,
                         "predicted": len(self.rows), "resumed": self.resumed, "skipped": len(skipped),
                         "finding_policy": self.finding_policy(), "model": model})
        self.partial.unlink(missing_ok=True)

    def _write_run(self, doc: dict[str, Any]) -> None:
        atomic_write_bytes(self.run_file, json.dumps(doc, indent=1, default=str).encode())
