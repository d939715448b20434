"""chexfound.stats is a leaf: it imports nothing from chexfound above `errors` (every layer may use it)."""

import subprocess
import sys


def test_stats_imports_no_other_chexfound_module():
    code = ("import sys, chexfound.stats; "
            "print(sorted(m for m in sys.modules if m.startswith('chexfound.') "
            "and not m.startswith(('chexfound.stats', 'chexfound.errors'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
