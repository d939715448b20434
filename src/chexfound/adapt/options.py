"""The options of `chexfound adapt` (one dataclass, what the CLI fills), their validation, and the head they
describe."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from chexfound.adapt.fit import DEFAULT_LRS
from chexfound.adapt.heads import GloriHead, Head, LinearHead, MLPHead
from chexfound.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class AdaptOptions:
    train: str
    out: str
    backbone: str | None = None
    config: str | None = None
    val: str | None = None
    val_split: float = 0.2
    labels: list[str] | None = None
    task: str = "multilabel"
    head: str = "glori"
    name: str | None = None
    uncertain: str = "nan"
    lrs: list[float] = field(default_factory=lambda: list(DEFAULT_LRS))
    weight_decays: list[float] = field(default_factory=lambda: [1e-4])
    epochs: int = 20
    batch_size: int = 64
    loss: str | None = None
    class_balance: str = "none"
    metric: str | None = None
    patience: int | None = None
    eval_every: int = 1
    threshold_method: str = "f1"
    n_blocks: int | None = None
    image_size: int | None = None
    flip_tta: bool = False
    flip_augment: bool = False
    cache: str | None = None
    features: str | None = None  # what `chexfound embed` wrote (token cache folder or pooled file): no backbone run
    # GLoRI / probe hyper-parameters
    decoder_dim: int = 768
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    cat_cls: bool = False
    learn_queries: bool = False
    coarse_pools: list[int] = field(default_factory=list)
    avgpool: bool = False
    hidden_dim: int = 1024
    # end to end
    finetune: str | None = None
    backbone_lr: float | None = None
    save_merged: bool = False  # LoRA / BitFit: also write the merged backbone (the adapter is always written)
    # outputs
    heatmaps: int = 0
    heatmap_top_k: int = 3
    # common
    device: str = "auto"
    dtype: str = "fp32"
    workers: int = 0
    seed: int = 0
    quiet: bool = False
    strict: bool = False
    grid_chunk: int | None = None
    compile: bool = False  # per-block torch.compile of the backbone while caching features (GPU)
    pack: bool = True      # CPU: oneDNN packed-weight backbone while caching features


def validate(opts: AdaptOptions) -> None:
    """Reject inconsistent options before any work (as ConfigError: the CLI prints them, exit 2)."""
    from chexfound.adapt.heads.base import HEAD_TYPES, TASKS
    from chexfound.data.uncertain import UNCERTAIN_POLICIES
    from chexfound.adapt.losses import LOSSES
    from chexfound.adapt.selection import TASK_METRICS

    if opts.task not in TASKS:
        raise ConfigError(None, f"unknown task {opts.task!r}; use one of {TASKS}")
    if opts.head not in HEAD_TYPES:
        raise ConfigError(None, f"unknown head {opts.head!r}; use one of {', '.join(HEAD_TYPES)}")
    if opts.loss and opts.loss not in LOSSES[opts.task]:
        raise ConfigError(None, f"--loss {opts.loss} does not fit a {opts.task} task; use {LOSSES[opts.task]}")
    if opts.metric and opts.metric not in TASK_METRICS[opts.task]:
        raise ConfigError(None, f"--metric {opts.metric} does not exist for a {opts.task} task; "
                                f"use {TASK_METRICS[opts.task]}")
    if not opts.lrs or not opts.weight_decays or any(v <= 0 for v in opts.lrs):
        raise ConfigError(None, "--lrs needs positive values and --wds at least one value")
    if opts.epochs < 1 or opts.batch_size < 1:
        raise ConfigError(None, "--epochs and --batch-size must be at least 1")
    if opts.save_merged and opts.finetune not in ("lora", "bitfit"):
        raise ConfigError(None, "--save-merged is for --finetune lora or bitfit (full fine-tuning always writes "
                                "the backbone)")
    if opts.finetune and opts.flip_augment:
        raise ConfigError(None, "--flip-augment applies to cached features; end-to-end runs augment images")
    if opts.flip_augment and not opts.flip_tta and not opts.features:
        raise ConfigError(None, "--flip-augment needs --flip-tta (features of flipped images in the cache)")
    if opts.uncertain not in UNCERTAIN_POLICIES:
        raise ConfigError(None, f"--uncertain {opts.uncertain}: use {', '.join(UNCERTAIN_POLICIES)}")
    if opts.features:
        # options of the backbone run that --features replaces: said, not silently dropped
        unused = [flag for flag, on in (("--dtype bf16", opts.dtype != "fp32"), ("--flip-tta", opts.flip_tta),
                                        ("--cache", bool(opts.cache)), ("--compile", opts.compile),
                                        ("--no-pack", not opts.pack), ("--workers", opts.workers > 0)) if on]
        if unused:
            log.warning("%s: %s %s no effect with --features (the backbone does not run here; these features were "
                        "computed by `chexfound embed` with its own options)", opts.features, ", ".join(unused),
                        "has" if len(unused) == 1 else "have")


def head_factory(opts: AdaptOptions, findings: list[str], n_blocks: int, embed_dim: int,
                 grid: Sequence[int] | None) -> Callable[[], Head]:
    task = opts.task
    if opts.head == "glori":
        return lambda: GloriHead(findings, n_blocks, task, embed_dim=embed_dim, decoder_dim=opts.decoder_dim,
                                 num_heads=opts.num_heads, ffn_dim=opts.ffn_dim, dropout=opts.dropout,
                                 cat_cls=opts.cat_cls, learn_queries=opts.learn_queries,
                                 coarse_pools=opts.coarse_pools,
                                 # a fixed grid only where pooling needs it: fine-only heads take any resolution
                                 grid=list(grid) if grid is not None and opts.coarse_pools else None)
    if opts.head == "linear":
        return lambda: LinearHead(findings, n_blocks, task, embed_dim=embed_dim, avgpool=opts.avgpool)
    if opts.head == "mlp":
        return lambda: MLPHead(findings, n_blocks, task, embed_dim=embed_dim, avgpool=opts.avgpool,
                               hidden_dim=opts.hidden_dim, dropout=opts.dropout)
    raise ConfigError(None, f"unknown head {opts.head!r}; use glori, linear or mlp")
