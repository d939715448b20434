"""`chexfound info` exits 1 when no input at all could be read (strict or not), 0 when one image was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chexfound.cli.main import main


def test_info_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["info", str(bad)]) == 1
    assert "no image could be read from 1 file(s)" in capsys.readouterr().err
    assert main(["info", str(empty)]) == 2  # no file to read at all: a usage error
    good = tmp_path / "good.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).astype(np.uint8)).save(good)
    assert main(["info", str(good), str(bad)]) == 0  # something was read: bad files fail only with --strict
    assert main(["info", "--strict", str(good), str(bad)]) == 1
    assert "exit status" in main_help("info").lower()


def main_help(verb: str) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main([verb, "--help"])
    return buf.getvalue()
