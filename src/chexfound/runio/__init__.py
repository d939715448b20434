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

The run-folder contract every command follows:
    write_skipped / append_skipped / read_skipped   skipped.csv: stage, index, path, reason (older layouts read)
    write_run_config / check_run_config             config.yaml, and the comparison a resume makes against it
    parse_overrides / apply_overrides / set_dotted  `key.sub=value` (`--set`), YAML values, unknown keys refused
    data_root()                                     $CHEXFOUND_DATA, else ../shared/data beside the checkout

Imports only the standard library and numpy (PyYAML when a config is read or written); torch is imported when a
device is resolved.
"""

from chexfound.runio.atomic import atomic_output, atomic_write_bytes, atomic_write_json, atomic_write_text
from chexfound.runio.datafolder import DATA_ENV, data_root
from chexfound.runio.device import resolve_device
from chexfound.runio.distributed import DistInfo, init_distributed
from chexfound.runio.jsonsafe import json_safe
from chexfound.runio.overrides import apply_overrides, parse_override, parse_overrides, set_dotted
from chexfound.runio.runconfig import (check_run_config, config_differences, dump_run_config, read_run_config,
                                       write_run_config)
from chexfound.runio.runlog import RunLog, read_jsonl, utc_now
from chexfound.runio.skipped import (SKIPPED_COLUMNS, SKIPPED_FILE, SkippedInput, append_skipped, find_skipped,
                                     read_skipped, skipped_rows, write_skipped)

__all__ = ["DATA_ENV", "SKIPPED_COLUMNS", "SKIPPED_FILE", "DistInfo", "RunLog", "SkippedInput", "append_skipped",
           "apply_overrides", "atomic_output", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "check_run_config", "config_differences", "data_root", "dump_run_config", "find_skipped",
           "init_distributed", "json_safe", "parse_override", "parse_overrides", "read_jsonl", "read_run_config",
           "read_skipped", "resolve_device", "set_dotted", "skipped_rows", "utc_now", "write_run_config",
           "write_skipped"]
