"""Options shared by several verbs, and old spellings that keep working.

`--config` means one thing on the command line: a pretraining recipe (`chexfound pretrain --config PRESET`).
Where it used to mean something else it was renamed, and the old spelling still works with a notice:
`embed/adapt --config NAME` -> `--backbone NAME` (a named architecture with random weights), and
`convert --config` / `embed --backbone-config` -> `--arch` (the architecture of weights that do not record it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence


class RenamedOption(argparse.Action):
    """An old name of an option: stores into the new option's `dest` and says on stderr which name to use."""

    def __init__(self, option_strings: Sequence[str], dest: str, replacement: str = "", **kwargs: Any) -> None:
        self.replacement = replacement
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def notice(self, option_string: str | None) -> str:
        return f"{option_string} is deprecated; use {self.replacement}"

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: {self.notice(option_string)}", file=sys.stderr)
        setattr(namespace, self.dest, values)


class DeprecatedOption(RenamedOption):
    """An old spelling of `--config` (which now means a pretraining recipe only): says so, and what to use."""

    def notice(self, option_string: str | None) -> str:
        return (f"{option_string} is deprecated here (it means a pretraining recipe only in `chexfound "
                f"pretrain`); use {self.replacement}")


def add_arch_options(p: argparse.ArgumentParser | Any, old_spelling: str | None = None) -> None:
    """--arch / --num-heads / --head-dim: what a checkpoint without a recorded architecture is."""
    p.add_argument("--arch", default=None, metavar="NAME|FILE",
                   help="the weights' architecture: a named config, a pretraining run's config.yaml, a "
                        "DINOv2/CheXFound config.yaml or a Hugging Face config.json (default: what the file or the "
                        "config beside it records; never guessed)")
    if old_spelling:
        p.add_argument(old_spelling, dest="arch", action=DeprecatedOption, replacement="--arch")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for a checkpoint that records no architecture (tensors cannot show it)")
    p.add_argument("--head-dim", type=int, default=None,
                   help="or the attention head width (64 in every DINOv2/CheXFound ViT)")


class _LazyChoices(Sequence[str]):
    """argparse `choices` read on first use (a value checked, --help printed), so building the parser does not
    import the stage (and torch) that owns them."""

    def __init__(self, load: Any, extra: Sequence[str] = ()) -> None:
        self._load, self._extra = load, tuple(extra)
        self._names: tuple[str, ...] | None = None

    def _all(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = (*self._load(), *self._extra)
        return self._names

    def __getitem__(self, i: Any) -> Any:
        return self._all()[i]

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def __repr__(self) -> str:
        return repr(list(self._all()))


def _head_types() -> tuple[str, ...]:
    from chexfound.adapt.heads import HEAD_TYPES

    return tuple(HEAD_TYPES)


def head_type_choices(*extra: str) -> Sequence[str]:
    """The head types of the registry in `chexfound.adapt.heads` (plus `extra`), as argparse choices."""
    return _LazyChoices(_head_types, extra)


def add_precision_options(p: argparse.ArgumentParser | Any) -> None:
    """--precision fp32|bf16|int8 (+ --allow-slow-precision); the old --dtype fp32|bf16 still works, with a notice."""
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="inference precision: fp32; bf16 (GEMMs and attention in bfloat16); int8 (CPU: int8 "
                        "Linears, activations quantized per token at run time). bf16/int8 are refused where "
                        "the CPU lacks the instructions that make them faster than fp32")
    p.add_argument("--dtype", dest="precision", choices=["fp32", "bf16"], action=RenamedOption,
                   replacement="--precision")
    p.add_argument("--allow-slow-precision", action="store_true",
                   help="run --precision bf16/int8 even where this CPU lacks the instructions that make it fast")
