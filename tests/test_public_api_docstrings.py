"""Every public name of every package (its `__all__`) has a docstring, and so has every public method and
property of its public classes: `help()` and an IDE answer what a name does without reading the code."""

from __future__ import annotations

import importlib
import inspect

PACKAGES = ["io", "data", "models", "stats", "adapt", "evaluate", "serve", "curate", "ssl", "runio", "errors"]


def _undocumented() -> list[str]:
    out = []
    for pkg in PACKAGES:
        mod = importlib.import_module(f"chexfound.{pkg}")
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
            if not (own or "").strip():
                out.append(f"chexfound.{pkg}.{name}")
            if not inspect.isclass(obj) or not obj.__module__.startswith("chexfound"):
                continue
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                fn = member.fget if isinstance(member, property) else getattr(member, "func", member)
                fn = fn.__func__ if isinstance(fn, (staticmethod, classmethod)) else fn
                if inspect.isfunction(fn) and not (fn.__doc__ or "").strip():
                    out.append(f"chexfound.{pkg}.{name}.{attr}")
    return sorted(set(out))


def test_public_api_has_docstrings() -> None:
    missing = _undocumented()
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)
