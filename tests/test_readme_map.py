"""The README's map of the package ("Where things live") matches the package: every module it names exists, and
every module under src/chexfound is named, so the map cannot go stale. A row names a package's modules in
backticks (`name`, a folder as `name/`, which covers the modules inside it, `prefix*` for a family); other
backticked words in a row are public names of that package (functions, classes) and must exist too."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "chexfound"


def _section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("### Where things live")
    end = text.index("\n## ", start)
    return text[start:end]


def _rows() -> dict[str, str]:
    """package -> its rooms cell ('demo', 'cli' share one row)."""
    rows: dict[str, str] = {}
    for line in _section().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        for pkg in re.findall(r"`([a-z_]+)`", cells[0]):
            rows[pkg] = cells[1]
    return rows


def _modules(pkg: str) -> set[str]:
    """Module paths under a package, relative to it, without .py (`readers/nih14`, `heads/glori`)."""
    root = SRC / pkg
    return {p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.py") if p.name != "__init__.py"}


def _public(pkg: str, name: str) -> bool:
    mod = importlib.import_module(f"chexfound.{pkg}")
    if hasattr(mod, name):
        return True
    return any(hasattr(importlib.import_module(f"chexfound.{pkg}.{m.replace('/', '.')}"), name)
               for m in _modules(pkg))


def _claims(pkg: str, cell: str) -> tuple[set[str], list[str]]:
    """(modules the row covers, names that are neither a module nor a public name)."""
    mods = _modules(pkg)
    covered: set[str] = set()
    wrong: list[str] = []
    for tok in re.findall(r"`([^`]+)`", cell):
        if " " in tok or "." in tok or tok.startswith("chexfound"):
            continue  # a command line, a file name, or a path outside the package (checked below)
        if tok.endswith("/"):
            inside = {m for m in mods if m.startswith(tok) or ("/" + tok) in ("/" + m)}
            covered |= inside
            if not inside and not (SRC / pkg / tok).is_dir():
                wrong.append(tok)
        elif tok.endswith("*"):
            hit = {m for m in mods if m.rsplit("/", 1)[-1].startswith(tok[:-1])}
            covered |= hit
            if not hit:
                wrong.append(tok)
        else:
            hit = {m for m in mods if m.rsplit("/", 1)[-1] == tok}
            covered |= hit
            if not hit and not _public(pkg, tok):
                wrong.append(tok)
    return covered, wrong


def test_every_package_has_a_row_and_every_row_a_package() -> None:
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    rows = set(_rows())
    leaves = {"runio"} & packages  # a leaf described in the section's text, with its own row if it has modules
    assert packages - rows == set(), f"packages missing from the README's map: {sorted(packages - rows)}"
    assert rows - packages == set(), f"README map rows for packages that do not exist: {sorted(rows - packages)}"
    assert leaves <= rows


def test_every_named_module_exists_and_every_module_is_named() -> None:
    missing: dict[str, list[str]] = {}
    wrong: dict[str, list[str]] = {}
    for pkg, cell in _rows().items():
        covered, bad = _claims(pkg, cell)
        left = sorted(_modules(pkg) - covered)
        if left:
            missing[pkg] = left
        if bad:
            wrong[pkg] = bad
    assert not wrong, f"README's map names what the package does not have: {wrong}"
    assert not missing, f"modules the README's map does not name: {missing}"


def test_top_level_modules_and_paths_in_the_section_exist() -> None:
    section = _section()
    top = {p.stem for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__")}
    for name in top:
        assert f"`chexfound.{name}`" in section, f"chexfound.{name} is not in the README's map"
    for ref in re.findall(r"`(chexfound[./][A-Za-z_./]+)`", section):
        path = SRC.parent / ref.replace(".", "/")
        assert path.exists() or path.with_suffix(".py").exists() or (SRC.parent / ref).exists(), ref
