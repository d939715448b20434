"""One error family. Every message names the file (or item) and the cause."""

from __future__ import annotations

from os import PathLike


class ChexfoundError(Exception):
    """Base class of every error the project raises on purpose."""


class _PathError(ChexfoundError):
    def __init__(self, path: str | PathLike[str] | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)

    def __reduce__(self) -> tuple[type, tuple[str | None, str]]:
        # Rebuilt from (path, reason), not from the message: a worker process's error reaches the parent intact.
        return (type(self), (self.path, self.reason))


class CXRReadError(_PathError):
    """An image file could not be read as a chest X-ray (corrupt, unsupported, wrong shape...)."""


class ManifestError(_PathError):
    """A manifest or label file is missing columns, paths or has invalid values."""


class CheckpointError(_PathError):
    """A checkpoint could not be loaded (truncated, unknown layout, mismatched keys or shapes)."""


class ConfigError(_PathError):
    """A configuration file or override is invalid."""


class DeviceError(ConfigError):
    """A requested device (--device, device=) is not a device name or does not exist on this machine."""
