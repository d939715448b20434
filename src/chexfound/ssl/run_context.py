"""What every stage of a pretraining run shares: its settings (read from the config once), the run folder,
the process's place in the job, the clock, the printed log and metrics.jsonl."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from chexfound.ssl import distributed as D
from chexfound.ssl.budget import Clock
from chexfound.ssl.diagnostics import read_metrics
from chexfound.ssl.heal import HealConfig


@dataclass(frozen=True)
class RunSettings:
    """The keys `pretrain` acts on (the recipe itself is read by the trainer, heads and schedules)."""

    batch_size: int
    epochs: float
    epoch_length: float
    time_budget_s: float | None
    log_every: int
    ckpt_every: int
    keep_last: int
    export_block_chunks: int
    export_bf16_shard_mib: float | None
    seed: int
    init_from: str | None
    pos_embed_on_resize: str
    cpu_threads: int | None
    budget: dict[str, Any]
    heal: HealConfig

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> RunSettings:
        t, c = cfg["train"], cfg["checkpoint"]
        budget = t.get("time_budget_s")
        return cls(batch_size=int(t["batch_size_per_gpu"]), epochs=float(cfg["optim"]["epochs"]),
                   epoch_length=float(t["epoch_length"]), time_budget_s=float(budget) if budget else None,
                   log_every=max(1, int(t["log_every"])), ckpt_every=int(c["every"]), keep_last=int(c["keep_last"]),
                   export_block_chunks=int(c["export_block_chunks"]),
                   export_bf16_shard_mib=c.get("export_bf16_shard_mib"), seed=int(t["seed"]),
                   init_from=t.get("init_from"), pos_embed_on_resize=t["pos_embed_on_resize"],
                   cpu_threads=t.get("cpu_threads"), budget=dict(cfg["budget"]), heal=HealConfig.from_config(cfg))


class MetricsLog:
    """metrics.jsonl (rank 0): one JSON object per line; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        from chexfound.models.format import atomic_write_bytes

        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def truncate_after(self, iteration: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        # Rows up to the checkpoint were written before it was saved; later ones belong to the lost tail.
        self._rewrite([r for r in read_metrics(self.path) if r.get("iteration", 0) <= iteration])

    def abandon_after(self, iteration: int, kinds: tuple[str, ...] = ("train", "probe")) -> int:
        """Relabel rows of `kinds` past `iteration` as `<kind>_abandoned` (a rollback); returns how many."""
        if not self.enabled or not self.path.exists():
            return 0
        rows, n = read_metrics(self.path), 0
        for r in rows:
            if r.get("kind") in kinds and r.get("iteration", 0) > iteration:
                r["kind"] = f"{r['kind']}_abandoned"
                n += 1
        if n:
            self._rewrite(rows)
        return n

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()


class PrintedLog:
    """`say`: print a line (or hand it to `echo`) and append it to <out>/pretrain.log (rank 0)."""

    def __init__(self, path: Path | None, echo: Callable[[str], None] | None) -> None:
        self.path, self.echo = path, echo or (lambda s: print(s, flush=True))

    def __call__(self, line: str) -> None:
        self.echo(line)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


@dataclass
class RunContext:
    cfg: dict[str, Any]
    settings: RunSettings
    out: Path
    info: D.DistInfo
    say: Callable[[str], None]
    metrics: MetricsLog
    clock: Clock
    t_start: float
    quiet: bool
    elapsed_before: float = 0.0  # seconds spent by earlier processes of a resumed run

    def elapsed(self) -> float:
        return self.elapsed_before + self.clock() - self.t_start
