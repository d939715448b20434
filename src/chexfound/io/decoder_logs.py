"""pydicom's and Pillow's own messages during a decode, routed through our logging in one place.

pydicom logs an ERROR with a full traceback whenever one of its pixel-data plugins fails (even when the
next plugin then succeeds), and Pillow warns `DecompressionBombWarning` on large images. Both used to
reach `chexfound predict`'s terminal as raw third-party output. So the "pydicom" logger gets one handler
of ours (installed once, on first use) instead of propagating to the root logger itself:
- while our reader decodes a file in this thread, pydicom's records are held back; the reader uses them
  to say what happened (in the `ImageReadError` it raises) and logs them at DEBUG under "chexfound.io",
  naming the file. Warnings raised inside a decode are collected the same way (a `warnings.showwarning`
  hook that looks at the calling thread);
- outside a decode, pydicom's records pass on through the "chexfound.io.thirdparty" logger, so the
  application's logging configuration (the CLI's format and level) applies to them as to ours.
"""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator, TextIO

log = logging.getLogger("chexfound.io")
_passthrough = logging.getLogger("chexfound.io.thirdparty")

THIRD_PARTY_LOGGERS = ("pydicom",)
_local = threading.local()
_installed = False
_install_lock = threading.Lock()


class _Router(logging.Handler):
    """Holds a record back into the current thread's decode, or passes it on to our logger."""

    def emit(self, record: logging.LogRecord) -> None:
        sink: list[str] | None = getattr(_local, "sink", None)
        if sink is not None:
            sink.append(record.getMessage())
        elif _passthrough.isEnabledFor(record.levelno):
            _passthrough.handle(record)


def install() -> None:
    """Route the third-party loggers through `_Router` (idempotent)."""
    global _installed
    with _install_lock:
        if not _installed:
            for name in THIRD_PARTY_LOGGERS:
                lg = logging.getLogger(name)
                lg.addHandler(_Router())
                lg.propagate = False  # their records reach the root through _Router, exactly once
            _installed = True
        _hook_warnings()


_previous_showwarning = warnings.showwarning


def _route_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: TextIO | None = None, line: str | None = None) -> None:
    """warnings.showwarning while installed: into the current thread's decode, else as before."""
    sink: list[str] | None = getattr(_local, "sink", None)
    if sink is not None:
        sink.append(f"{category.__name__}: {message}")
    else:
        _previous_showwarning(message, category, filename, lineno, file, line)


def _hook_warnings() -> None:
    # Not warnings.catch_warnings(): it swaps process-wide state on enter and exit, which concurrent decodes
    # (the server's thread pool) would interleave. One hook that looks at the calling thread is safe; it is
    # re-installed if something (logging.captureWarnings, a test's catch_warnings) replaced it since.
    global _previous_showwarning
    if warnings.showwarning is not _route_warning:
        _previous_showwarning = warnings.showwarning
        warnings.showwarning = _route_warning


@contextmanager
def decoder_messages(path: str) -> Iterator[list[str]]:
    """Collect what pydicom logs and what any library warns while the block runs in this thread; yields
    the list (filled as the block runs) and logs each message at DEBUG naming `path` when it ends."""
    install()
    outer = getattr(_local, "sink", None)
    sink: list[str] = []
    _local.sink = sink
    try:
        yield sink
    finally:
        _local.sink = outer
        for msg in sink:
            log.debug("%s: decoder said: %s", path, msg)
