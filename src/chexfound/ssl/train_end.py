"""The end of a pretraining run: the final checkpoint, the teacher exports (chexfound.ssl.exports), the final
probe comparison (re-planned against the time budget actually left), the run report and the budget's account."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chexfound.runio import read_jsonl
from chexfound.ssl import distributed as D
from chexfound.ssl.checkpoint import checkpoint_path, full_model_state, latest_checkpoint
from chexfound.ssl.diagnostics import loss_trend, plot_report
from chexfound.ssl.exports import TeacherExports, initial_teacher
from chexfound.ssl.run_context import RunContext
from chexfound.ssl.train_loop import LoopOutcome, TrainLoop


@dataclass
class RunResult:
    out_dir: Path
    iterations: int
    stopped_early: bool = False
    comparison: dict[str, Any] = field(default_factory=dict)
    exports: dict[str, Path] = field(default_factory=dict)


def finish(ctx: RunContext, loop: TrainLoop, prober: Any, outcome: LoopOutcome, n_items: int) -> RunResult:
    trainer, out, main, done = loop.trainer, ctx.out, ctx.info.is_main, outcome.done
    if latest_checkpoint(out) != checkpoint_path(out, done):
        # A run cut short by its deadline ends here: its checkpoint says so, and a rerun does not train on.
        loop.save(done, total=done)
    result = RunResult(out, done)
    exports = TeacherExports(ctx, trainer, full_model_state(trainer.meta, trainer.sharded), done, n_items)
    if main:
        result.exports = exports.write()
        if trend := loss_trend(read_jsonl(out / "metrics.jsonl")):
            ctx.say(trend)
    trainer.check_replicas(ctx.metrics)
    budget = loop.budget  # the final probes re-planned against the time left
    plan = budget.final_plan(prober.final_cost, loop.plot_s) if main and prober.enabled else budget.plan
    result.comparison = prober.final(exports.model_sd, ctx.metrics, init_backbone=lambda: initial_teacher(ctx.cfg),
                                     plan=plan, fits=lambda seconds: budget.final_fits(seconds, loop.plot_s))
    if main:
        exports.cards_with_results(result.comparison)
        if png := plot_report(out / "metrics.jsonl", out / "report.png", title=f"{ctx.cfg.get('_preset')}: {out}"):
            ctx.say(f"run report: {png}")
    budget.account(done, loop.total, outcome.train_s)  # the closing row and line
    D.barrier()
    return result
