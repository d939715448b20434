"""Code, presets, docs, tests and benches describe the software, never the project's tracker; the run logs
docs/pretraining.md relies on are indexed, and every one it names is there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a tracker reference looks like: the word for a ticket, or for one of its bullet points, and a number.
# Built from parts so that this file does not match itself.
TRACKER = re.compile(r"\b" + "is" + r"sue\s*#?\d+|\b" + "it" + r"em\s+\d+\b", re.I)
TREES = ["src", "docs", "tests", "bench"]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".html", ".js", ".css", ".toml", ".cfg"}


def _files() -> list[Path]:
    out = [REPO / "README.md", REPO / "Makefile"]
    for tree in TREES:
        out += [p for p in (REPO / tree).rglob("*") if p.is_file() and p.suffix in SUFFIXES
                and "__pycache__" not in p.parts]
    return out


def test_no_tracker_references() -> None:
    hits = []
    for p in _files():
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for _ in TRACKER.finditer(line):
                hits.append(f"{p.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "tracker references (say what the software does instead):\n" + "\n".join(hits)


def test_run_logs_are_indexed_and_cited_ones_exist() -> None:
    proof = REPO / "docs" / "proof"
    folders = {p.name for p in proof.iterdir() if p.is_dir()}
    index = (proof / "README.md").read_text()
    listed = re.findall(r"^\| `([^`]+)` \|", index, re.M)
    assert sorted(listed) == sorted(folders), "docs/proof/README.md: one row per run folder"
    cited = set(re.findall(r"docs/proof/([A-Za-z0-9_.\-]+)/", (REPO / "docs" / "pretraining.md").read_text()))
    record = (REPO / "docs" / "pretraining.md").read_text()
    cited |= {f for f in folders if f"`{f}`" in record}
    assert cited and cited <= folders
    assert folders - cited == set(), f"run folders nothing cites: {sorted(folders - cited)}"
