"""A Hugging Face Hub cache folder written by hand in the hub's own layout, for offline tests:

    <HF_HOME>/hub/models--OWNER--NAME/refs/<revision>            the commit the revision points at
    <HF_HOME>/hub/models--OWNER--NAME/snapshots/<commit>/<file>   symlinks to the blobs
    <HF_HOME>/hub/models--OWNER--NAME/blobs/<sha256 of the file>  the bytes
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def put_in_hub_cache(hf_home: Path, repo_id: str, files: dict[str, bytes | Path], commit: str = "c0ffee" * 6 + "abcd",
                     revision: str = "main") -> Path:
    """Write `files` ({path in repo: bytes or a file to copy}) as one commit of `repo_id`; -> the snapshot folder."""
    assert len(commit) == 40
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snap = repo / "snapshots" / commit
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap
