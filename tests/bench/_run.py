"""Run a bench the way a user does: `PYTHONPATH=src python bench/NAME.py ARGS` from the repository root, in a fresh
process that has none of the test suite's imports or environment (no tiny configs registered for it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCHES = sorted(p.stem for p in (REPO / "bench").glob("[!_]*.py"))


def run_bench(name: str, *args: str, data: Path | None = None, timeout: float = 540) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CHEXFOUND_MODEL_MODULES", "PYTHONPATH")}
    env["PYTHONPATH"] = "src"
    env["OMP_NUM_THREADS"] = "1"
    if data is not None:
        env["CHEXFOUND_DATA"] = str(data)
    r = subprocess.run([sys.executable, f"bench/{name}.py", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"bench/{name}.py {' '.join(args)} exited {r.returncode}:\n" + \
        r.stdout[-3000:] + r.stderr[-3000:]
    return r
