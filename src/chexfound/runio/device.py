"""One device rule for every command: `--device auto|cpu|cuda|cuda:N|mps` -> a torch.device that exists here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chexfound.errors import DeviceError

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device"]

AUTO = (None, "", "auto")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None) -> cuda when a GPU is visible, else cpu; anything else is checked here, so asking for
    a device this machine does not have fails at once with DeviceError instead of deep inside a model.
    "cuda" without an index stays unindexed (the current device; under torchrun init_distributed picks the
    local rank's)."""
    import torch  # lazily: `chexfound.runio` is imported by light tools that never touch torch

    if device in AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip())
    except (RuntimeError, ValueError) as e:
        raise DeviceError(None, f"device {device!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise DeviceError(None, f"device {device}: CUDA is not available here ({why}); use --device cpu or auto")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceError(None, f"device {device}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(None, f"device {device}: Apple MPS is not available here; use --device cpu or auto")
    elif dev.type != "cpu":
        raise DeviceError(None, f"device {device}: unsupported device type {dev.type!r}; use auto, cpu, cuda, "
                                "cuda:N or mps")
    return dev
