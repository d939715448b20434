"""The probe's "off" message says why: the setting switched it off, or no Kermany folder was found."""

from __future__ import annotations

from pathlib import Path

import pytest

from chexfound.ssl.probe import probes_off_reason, resolve_kermany


@pytest.mark.parametrize("value", [None, False, "off", "none"])
def test_setting_off_is_named_not_reported_as_missing(value: object) -> None:
    cfg = {"probe": {"kermany": value}, "data": {"sources": []}}
    assert resolve_kermany(cfg) is None
    msg = probes_off_reason(cfg)
    assert f"probe.kermany={value}" in msg and "not found" not in msg


def test_auto_without_a_folder_says_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHEXFOUND_DATA", str(tmp_path))
    cfg = {"probe": {"kermany": "auto"}, "data": {"sources": [str(tmp_path)]}}
    assert resolve_kermany(cfg) is None
    assert "no Kermany folder found" in probes_off_reason(cfg)
