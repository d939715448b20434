"""Without the shared data, tests that need it skip with one reason (a user's clone); in CI they fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = "tests/io/test_io_dicom_real.py"  # reads $CHEXFOUND_DATA/dicom through the data_root fixture


def _pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(CHEXFOUND_DATA=str(tmp_path / "absent"), PYTHONPATH=str(REPO / "src"))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider", SAMPLE],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_absent_data_skips_with_one_reason_and_fails_in_ci(tmp_path: Path) -> None:
    r = _pytest(tmp_path, None)
    assert r.returncode == 0 and " skipped" in r.stdout and "passed" not in r.stdout, r.stdout[-2000:]
    reasons = {line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("SKIPPED")}
    assert len(reasons) == 1 and "needs the shared data" in reasons.pop()
    r = _pytest(tmp_path, "true")
    assert r.returncode != 0 and "needs the shared data" in r.stdout, r.stdout[-2000:]
    assert _pytest(tmp_path, "false").returncode == 0  # CI=false is not CI
