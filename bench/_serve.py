"""The serve benches' shared parts: a small random model written to disk, and `chexfound serve` started in a
subprocess on a free local port (the way a user starts it), stopped when the block ends."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from chexfound.adapt import LinearHead, save_head  # noqa: E402
from chexfound.models import backbone_sha256, create_backbone, save_backbone  # noqa: E402

HOST = "127.0.0.1"  # never anything else: the benches open no port to the network


def make_model(tmp: Path, config: str, findings: Sequence[str]) -> tuple[Path, Path]:
    """A seeded random backbone `config` and a linear head on `findings`, saved under tmp: (backbone, head)."""
    torch.manual_seed(0)
    bb = create_backbone(config).eval()
    save_backbone(bb, tmp / "backbone.safetensors")
    save_head(LinearHead(list(findings), n_blocks=min(4, bb.cfg.depth), embed_dim=bb.embed_dim),
              tmp / "head.safetensors", backbone_sha256=backbone_sha256(bb))
    return tmp / "backbone.safetensors", tmp / "head.safetensors"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(backbone: Path, head: Path, extra: Sequence[str], log_level: str = "warning",
                  start_timeout: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`chexfound serve` on a free port of HOST with `extra` arguments; yields (base url, process) once
    /healthz answers, and terminates the server (killing it after 15 s) when the block ends."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "chexfound", "serve", "--backbone", str(backbone), "--head", str(head),
           "--host", HOST, "--port", str(port), "--log-level", log_level, *extra]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"chexfound serve exited with {proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"chexfound serve did not come up within {start_timeout:.0f} s")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
