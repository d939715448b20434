"""The end of a pretraining run: the final checkpoint, the teacher exports, the final probe comparison (re-
planned against the time budget actually left), the run report and the budget's account."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chexfound.models import VisionTransformer
from chexfound.runio import read_jsonl
from chexfound.ssl import distributed as D
from chexfound.ssl.checkpoint import export_teacher, export_teacher_shards, full_model_state, latest_checkpoint
from chexfound.ssl.diagnostics import loss_trend, plot_report
from chexfound.ssl.init_source import init_from_checkpoint
from chexfound.ssl.meta_arch import SSLMetaArch
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
    trainer, s, out = loop.trainer, ctx.settings, ctx.out
    done = outcome.done
    final_ckpt = latest_checkpoint(out)
    if final_ckpt is None or final_ckpt.name != f"ckpt_{done:08d}.pt":
        # A run cut short by its deadline ends here: its checkpoint says so, and a rerun does not train on.
        loop.save(done, total=done)
    result = RunResult(out, done)
    full_sd = full_model_state(trainer.meta, trainer.sharded)
    if ctx.info.is_main:
        extra = _provenance(ctx, trainer, done, n_items)
        result.exports = export_teacher(out, full_sd, trainer.vit_config, s.export_block_chunks, extra)
        ctx.say(f"teacher exported: {result.exports['ours']} (ours), {result.exports['original']} (original layout)")
        if s.export_bf16_shard_mib:
            shards = export_teacher_shards(out / "teacher_bf16", full_sd, trainer.vit_config,
                                           float(s.export_bf16_shard_mib), extra)
            ctx.say(f"teacher as {len(shards)} bf16 shard(s) of <= {s.export_bf16_shard_mib} MiB in "
                    f"{out / 'teacher_bf16'}")
        if trend := loss_trend(read_jsonl(out / "metrics.jsonl")):
            ctx.say(trend)
    trainer.check_replicas(ctx.metrics)
    budget, plan = loop.budget, loop.budget.plan
    if ctx.info.is_main and prober.enabled:  # the final probes re-planned against the time left
        plan = budget.final_plan(prober.final_cost, loop.plot_s)
    result.comparison = prober.final(full_sd, ctx.metrics, init_backbone=lambda: initial_teacher(ctx.cfg),
                                     plan=plan, fits=lambda seconds: budget.final_fits(seconds, loop.plot_s))
    if ctx.info.is_main and result.comparison:
        _cards_with_results(ctx, trainer, full_sd, done, n_items, result.comparison)
    if ctx.info.is_main:
        png = plot_report(out / "metrics.jsonl", out / "report.png", title=f"{ctx.cfg.get('_preset')}: {out}")
        if png:
            ctx.say(f"run report: {png}")
        took = ctx.elapsed()
        train_s = outcome.train_s
        row = {"kind": "budget", "event": "end", "iterations": done, "planned_iterations": loop.total,
               "elapsed_s": took, "training_s": train_s, "training_fraction": train_s / max(took, 1e-9)}
        if s.time_budget_s:
            row.update(budget_s=s.time_budget_s, budget_used=took / s.time_budget_s)
        ctx.metrics.write_row(row)
        used = (f" (budget {s.time_budget_s:.0f}s: {100 * took / s.time_budget_s:.0f}% used)"
                if s.time_budget_s else "")
        ctx.say(f"done in {took:.0f}s{used}, {train_s:.0f}s of it training ({100 * train_s / max(took, 1e-9):.0f}%); "
                f"run folder {out}")
    D.barrier()
    return result


def _provenance(ctx: RunContext, trainer: Any, done: int, n_items: int) -> dict[str, Any]:
    """What the exported teacher records of this run (its `ssl` provenance)."""
    extra = {"preset": ctx.cfg.get("_preset"), "iterations": done, "images_seen": done * trainer.global_batch,
             "n_images": n_items, "data": [str(x.get("path") if isinstance(x, dict) else x)
                                           for x in ctx.cfg["data"]["sources"]]}
    if ctx.cfg["train"].get("init_from"):
        extra["init_from"] = str(ctx.cfg["train"]["init_from"])
    return extra


def _cards_with_results(ctx: RunContext, trainer: Any, full_sd: dict[str, torch.Tensor], done: int,
                        n_items: int, comparison: dict[str, Any]) -> None:
    """The teacher exports' model cards again, now with the final probe comparison (probe_comparison.json)."""
    from chexfound.models.card_results import probe_comparison_tables
    from chexfound.models.ours import checkpoint_entry
    from chexfound.ssl.checkpoint import teacher_backbone_from_state, write_teacher_cards

    vit = teacher_backbone_from_state(full_sd, trainer.vit_config)
    extra = _provenance(ctx, trainer, done, n_items)
    cards = write_teacher_cards(ctx.out, vit, checkpoint_entry(vit, extra={"ssl": extra}),
                                probe_comparison_tables(comparison, "probe_comparison.json"))
    ctx.say(f"model cards with the probe comparison: {', '.join(str(c) for c in cards)}")


def initial_teacher(cfg: dict[str, Any]) -> VisionTransformer:
    """The teacher backbone as it was at iteration 0 (same seed, same init_from): the fairest baseline."""
    torch.manual_seed(int(cfg["train"]["seed"]))
    meta = SSLMetaArch(cfg)
    if cfg["train"]["init_from"]:
        init_from_checkpoint(meta.student, meta.teacher, cfg["train"]["init_from"], cfg["train"]["pos_embed_on_resize"])
    return meta.teacher.backbone.eval()
