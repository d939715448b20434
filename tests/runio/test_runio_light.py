"""chexfound.runio sits below everything: importing it must not pull in torch or any other stage."""

from __future__ import annotations

import subprocess
import sys


def test_importing_runio_loads_no_torch_and_no_other_stage():
    code = ("import sys, chexfound.runio as r; r.atomic_write_bytes, r.RunLog, r.json_safe, r.init_distributed\n"
            "heavy = sorted(m for m in sys.modules if m == 'torch' or (m.startswith('chexfound.') and "
            "m.split('.')[1] not in ('runio', 'errors')))\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
