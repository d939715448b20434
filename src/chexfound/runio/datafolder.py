"""Where the shared data lives: `$CHEXFOUND_DATA`, else `../shared/data` beside the repository checkout.

The one default every command and config uses (`--data` of the demo, `${CHEXFOUND_DATA}` in presets, the
pretraining probes' Kermany folder). Run from a source tree (`src/chexfound`), "beside the checkout" is found
from this file, so it does not depend on the working directory; an installed package has no checkout, and
then it is `../shared/data` from the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV", "data_root"]

DATA_ENV = "CHEXFOUND_DATA"


def data_root() -> Path:
    """`$CHEXFOUND_DATA` when set (and not empty), else `<folder holding the checkout>/shared/data`."""
    env = os.environ.get(DATA_ENV, "")
    if env:
        return Path(os.path.expanduser(env))
    here = Path(__file__).resolve()
    if here.parents[2].name == "src":  # src/chexfound/runio/datafolder.py: parents[3] is the checkout
        return here.parents[3].parent / "shared" / "data"
    return Path("..") / "shared" / "data"
