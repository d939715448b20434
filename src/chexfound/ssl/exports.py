"""What a finished pretraining run exports of its teacher: the backbone in our format and in the original
checkpoint layout (`chexfound.ssl.checkpoint.export_teacher`), optionally as bf16 shards, each with the run's
provenance and a model card; the cards again once the final probe comparison is measured; and the teacher as
it was at iteration 0, the comparison's fairest baseline (`initial_teacher`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chexfound.models import VisionTransformer
from chexfound.ssl.checkpoint import export_teacher, export_teacher_shards
from chexfound.ssl.init_source import init_from_checkpoint
from chexfound.ssl.meta_arch import SSLMetaArch
from chexfound.ssl.run_context import RunContext


@dataclass
class TeacherExports:
    """The teacher of a run that ran `iterations` on `n_images` images (rank 0 writes)."""

    ctx: RunContext
    trainer: Any
    model_sd: dict[str, torch.Tensor]  # the full model state (`full_model_state`)
    iterations: int
    n_images: int

    def provenance(self) -> dict[str, Any]:
        """What every export records of this run (its `ssl` provenance)."""
        cfg = self.ctx.cfg
        extra = {"preset": cfg.get("_preset"), "iterations": self.iterations,
                 "images_seen": self.iterations * self.trainer.global_batch, "n_images": self.n_images,
                 "data": [str(x.get("path") if isinstance(x, dict) else x) for x in cfg["data"]["sources"]]}
        if cfg["train"].get("init_from"):
            extra["init_from"] = str(cfg["train"]["init_from"])
        return extra

    def write(self) -> dict[str, Path]:
        """Ours + the original layout (+ bf16 shards when `checkpoint.export_bf16_shard_mib` is set); says where.
        Returns {"ours": file, "original": file}."""
        ctx, s, vit_config, extra = self.ctx, self.ctx.settings, self.trainer.vit_config, self.provenance()
        files = export_teacher(ctx.out, self.model_sd, vit_config, s.export_block_chunks, extra)
        ctx.say(f"teacher exported: {files['ours']} (ours), {files['original']} (original layout)")
        if s.export_bf16_shard_mib:
            shards = export_teacher_shards(ctx.out / "teacher_bf16", self.model_sd, vit_config,
                                           float(s.export_bf16_shard_mib), extra)
            ctx.say(f"teacher as {len(shards)} bf16 shard(s) of <= {s.export_bf16_shard_mib} MiB in "
                    f"{ctx.out / 'teacher_bf16'}")
        return files

    def cards_with_results(self, comparison: dict[str, Any]) -> None:
        """The exports' model cards again, now with the final probe comparison (probe_comparison.json; none:
        nothing to add)."""
        if not comparison:
            return
        from chexfound.models.card_results import probe_comparison_tables
        from chexfound.models.ours import checkpoint_entry
        from chexfound.ssl.checkpoint import teacher_backbone_from_state, write_teacher_cards

        vit = teacher_backbone_from_state(self.model_sd, self.trainer.vit_config)
        cards = write_teacher_cards(self.ctx.out, vit, checkpoint_entry(vit, extra={"ssl": self.provenance()}),
                                    probe_comparison_tables(comparison, "probe_comparison.json"))
        self.ctx.say(f"model cards with the probe comparison: {', '.join(str(c) for c in cards)}")


def initial_teacher(cfg: dict[str, Any]) -> VisionTransformer:
    """The teacher backbone as it was at iteration 0 (same seed, same init_from): the fairest baseline."""
    torch.manual_seed(int(cfg["train"]["seed"]))
    meta = SSLMetaArch(cfg)
    if cfg["train"]["init_from"]:
        init_from_checkpoint(meta.student, meta.teacher, cfg["train"]["init_from"], cfg["train"]["pos_embed_on_resize"])
    return meta.teacher.backbone.eval()
