"""Run I/O: how every command writes its run folder and picks its device. A leaf below every stage.

    atomic_write_bytes / atomic_write_text / atomic_write_json (path, data) -> Path   temp + fsync + rename
    atomic_output(path)            context manager: a temp path for any writer, renamed on success
    json_safe(obj)                 numpy / tensors / paths / dataclasses / sets -> JSON types, NaN/inf -> None
    RunLog(path, enabled=True)     metrics.jsonl: .write(kind, **fields) adds `kind` and `time` (ISO-8601 UTC)
    read_jsonl(path)               rows of a JSON-lines file, a torn line skipped
    utc_now()                      the one time format (ISO-8601 UTC)
    resolve_device(spec)           "auto" | "cpu" | "cuda" | "cuda:1" | "mps" | torch.device -> torch.device
    init_distributed(device)       torchrun's process group + this rank's device -> DistInfo (distributed.py
                                   also holds the collectives that are no-ops in a single process)

Imports only the standard library and numpy; torch is imported when a device is resolved.
"""

from chexfound.runio.atomic import atomic_output, atomic_write_bytes, atomic_write_json, atomic_write_text
from chexfound.runio.device import resolve_device
from chexfound.runio.distributed import DistInfo, init_distributed
from chexfound.runio.jsonsafe import json_safe
from chexfound.runio.runlog import RunLog, read_jsonl, utc_now

__all__ = ["DistInfo", "RunLog", "atomic_output", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "init_distributed", "json_safe", "read_jsonl", "resolve_device", "utc_now"]
