"""What every stage of a pretraining run shares: its settings (read from the config once), the run folder,
the process's place in the job, the clock, the printed log and metrics.jsonl."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from chexfound.runio import RunLog, atomic_write_text, read_jsonl
from chexfound.ssl import distributed as D
from chexfound.ssl.budget import Clock
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


class MetricsLog(RunLog):
    """metrics.jsonl of a pretraining run: the project's RunLog (rank 0 writes; on resume, rows past the
    checkpoint are dropped), plus what a rollback needs: relabelling the rows of the stretch it undid."""

    def write_row(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """`write` for a row built as a dict with its `kind`."""
        return self.write(row["kind"], **{k: v for k, v in row.items() if k != "kind"})

    def abandon_after(self, iteration: int, kinds: tuple[str, ...] = ("train", "probe")) -> int:
        """Relabel rows of `kinds` past `iteration` as `<kind>_abandoned` (a rollback); returns how many."""
        if not self.enabled or not self.path.exists():
            return 0
        rows, n = read_jsonl(self.path), 0
        for r in rows:
            if r.get("kind") in kinds and isinstance(r.get("iteration"), (int, float)) and r["iteration"] > iteration:
                r["kind"] = f"{r['kind']}_abandoned"
                n += 1
        if n:
            atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
        return n


class PrintedLog:
    """`say`: print a line (or hand it to `echo`) and append it to <out>/pretrain.log (rank 0)."""

    def __init__(self, path: Path | None, echo: Callable[[str], None] | None) -> None:
        self.path, self.echo = path, echo or (lambda s: print(s, flush=True))

    def __call__(self, line: str) -> None:
        self.echo(line)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")

    @contextlib.contextmanager
    def echoing_to(self, echo: Callable[[str], None]) -> Iterator[None]:
        """Lines go to `echo` for a while (a progress bar's `write`, so they do not tear the bar), and still to
        the log file."""
        before, self.echo = self.echo, echo
        try:
            yield
        finally:
            self.echo = before


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

    @contextlib.contextmanager
    def progress_bar(self, total: int, start: int) -> Iterator[Any]:
        """A tqdm bar for the iterations (rank 0, not quiet, something left to do; else None); while it is up
        the run's lines are written through it, so they do not tear it (and still to pretrain.log)."""
        if not self.info.is_main or self.quiet or start >= total:
            yield None
            return
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="pretrain", unit="it", dynamic_ncols=True)
        routed = self.say.echoing_to(bar.write) if isinstance(self.say, PrintedLog) else contextlib.nullcontext()
        try:
            with routed:
                yield bar
        finally:
            bar.close()
