"""The import graph of src/chexfound: no circles, layers only import downwards, no private names across modules.

Layers, bottom to top:  leaves (errors, runio, stats, the package root)  ->  io  ->  data  ->  models  ->
ssl | adapt | curate  ->  evaluate | serve  ->  demo  ->  cli. A module may import its own area and any area
below it; areas on the same layer (ssl and adapt, evaluate and serve) do not import each other, except the
leaves (runio raises chexfound.errors).
Every import counts: module level, inside functions (the lazy ones) and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "chexfound"

LEAVES = ("", "errors", "runio", "stats")  # "" is the package root (chexfound/__init__.py: the version)
LAYERS: dict[str, int] = {
    **{leaf: 0 for leaf in LEAVES},
    "io": 1, "data": 2, "models": 3,
    "ssl": 4, "adapt": 4, "curate": 4,
    "evaluate": 5, "serve": 5,
    "demo": 6,
    "cli": 7,
}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. chexfound.serve.predictor
    target: str  # imported module (or package, for `from package import name`)
    name: str | None  # the name taken from it, for `from x import name`
    line: int

    def where(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}" + (f".{self.name}" if self.name else "")


def module_files(src: Path = SRC) -> dict[str, Path]:
    mods = {}
    for p in sorted(src.rglob("*.py")):
        parts = list(p.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _lazy_root_exports(tree: ast.Module) -> set[int]:
    # chexfound.__init__'s PEP 562 __getattr__ hands out `chexfound.Predictor` on first use; it is the public
    # facade, not a dependency of the root (which every module imports for __version__).
    return {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f)}


def import_edges(mods: dict[str, Path]) -> list[Edge]:
    edges = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _lazy_root_exports(tree) if mod == "chexfound" else set()
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                edges += [Edge(mod, a.name, None, node.lineno) for a in node.names
                          if a.name.split(".")[0] == "chexfound"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "chexfound":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    # `from chexfound.models import format` imports a module; `from x import name`, a name of x
                    edges.append(Edge(mod, sub, None, node.lineno) if sub in mods
                                 else Edge(mod, target, a.name, node.lineno))
    return edges


def area(mod: str) -> str:
    """chexfound.serve.predictor -> "serve"; the package root -> ""; `python -m chexfound` is the CLI."""
    parts = mod.split(".")
    name = parts[1] if len(parts) > 1 else ""
    return "cli" if name == "__main__" else name


def find_cycles(mods: dict[str, Path], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for e in edges:
        if e.target in mods and e.target != e.source:
            graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def layer_violations(edges: list[Edge]) -> list[str]:
    bad = []
    for e in edges:
        a, b = area(e.source), area(e.target)
        if a == b:
            continue
        if a not in LAYERS or b not in LAYERS:
            bad.append(f"{e.where()}: area {a if a not in LAYERS else b!r} has no layer (add it to LAYERS)")
        elif LAYERS[b] > LAYERS[a] or (LAYERS[b] == LAYERS[a] and LAYERS[a] > 0):  # leaves may use leaves
            how = "a higher layer" if LAYERS[b] > LAYERS[a] else "a sibling on the same layer"
            bad.append(f"{e.where()}: {a or 'chexfound'} may not import {how} ({b or 'chexfound'})")
    return bad


def private_imports(edges: list[Edge]) -> list[str]:
    """`from chexfound.x import _name` where x is another module: make the name public, or move it."""
    return [e.where() for e in edges
            if e.name and e.name.startswith("_") and not e.name.startswith("__") and e.target != e.source]


# -- the rules on the real package ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Edge]]:
    mods = module_files()
    return mods, import_edges(mods)


def test_the_graph_is_read(graph):
    mods, edges = graph
    assert {"chexfound.runio", "chexfound.models.vit", "chexfound.cli.main"} <= set(mods)
    # function-level imports count: the CLI imports its commands' machinery lazily
    assert any(e.source.startswith("chexfound.cli") and area(e.target) == "models" for e in edges)


def test_no_import_cycles(graph):
    mods, edges = graph
    cycles = find_cycles(mods, edges)
    detail = []
    for comp in cycles:
        inside = set(comp)
        detail += [f"  {e.where()}" for e in edges if e.source in inside and e.target in inside]
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_layers_import_downwards_only(graph):
    bad = layer_violations(graph[1])
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules(graph):
    bad = private_imports(graph[1])
    assert not bad, "\n".join(bad)


def test_every_area_has_a_layer(graph):
    mods, _ = graph
    assert {area(m) for m in mods} <= set(LAYERS)


# -- the checker itself catches what it should -------------------------------------------------------------
def _fake_package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        p = tmp_path / "chexfound" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return module_files(tmp_path / "chexfound")


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    mods = _fake_package(tmp_path, {
        "__init__.py": "",
        "serve/__init__.py": "",
        "serve/a.py": "from chexfound.serve.b import thing\n",
        "serve/b.py": "def thing():\n    from chexfound.serve import a\n    return a\n",
    })
    assert find_cycles(mods, import_edges(mods)) == [["chexfound.serve.a", "chexfound.serve.b"]]


def test_checker_finds_upward_and_sibling_imports_and_private_names(tmp_path):
    mods = _fake_package(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/t.py": "from chexfound.models.config import MEAN\n",
        "models/__init__.py": "",
        "models/config.py": "MEAN = 0\n",
        "ssl/__init__.py": "",
        "ssl/x.py": "from chexfound.adapt.y import _helper\n",
        "adapt/__init__.py": "",
        "adapt/y.py": "def _helper():\n    pass\n",
        "runio.py": "from chexfound.errors import E\n",
        "errors.py": "class E(Exception):\n    pass\n",
    })
    edges = import_edges(mods)
    bad = layer_violations(edges)
    assert len(bad) == 2
    assert any("chexfound.data.t:1" in b and "higher layer (models)" in b for b in bad)
    assert any("chexfound.ssl.x:1" in b and "sibling" in b for b in bad)
    assert private_imports(edges) == ["chexfound.ssl.x:1 imports chexfound.adapt.y._helper"]
