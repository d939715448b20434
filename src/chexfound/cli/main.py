"""Entry point: discovers the verbs in `chexfound.cli.commands` so each stage owns its own command."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Sequence

from chexfound import __version__
from chexfound.errors import ChexfoundError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chexfound",
        description="CheXFound chest X-ray foundation model: read, curate, pretrain, adapt, evaluate, predict, serve.",
    )
    parser.add_argument("--version", action="version", version=f"chexfound {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from chexfound.cli import commands

    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"chexfound.cli.commands.{mod.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # Third-party warnings become log records in the same format (chexfound.io already routes pydicom's
    # logger and holds back decoder chatter about files it reports itself).
    logging.captureWarnings(True)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except ChexfoundError as e:
        print(f"chexfound {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chexfound {args.command}: interrupted (finished work is kept; rerun to resume)", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
