"""Grid training: one pass trains every config exactly as alone; selection, thresholds, early stopping, tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chexfound.adapt import GloriHead, LinearHead, MLPHead
from chexfound.adapt.sources import TensorFeatures
from chexfound.adapt.fit import fit_heads

P, D = 16, 8


def _data(n, seed, task="multilabel"):
    g = torch.Generator().manual_seed(seed)
    feats = tuple((torch.randn(n, P, D, generator=g), torch.randn(n, D, generator=g)) for _ in range(2))
    w = torch.randn(2 * D, 3, generator=torch.Generator().manual_seed(99))
    s = (torch.cat([feats[-1][0].mean(1) * 4, feats[-1][1]], 1) @ w).numpy()
    if task == "multilabel":
        y = (s > 0).astype(np.float32)
        y[::5, 1] = np.nan  # unlabelled entries
        y[7] = np.nan  # a fully unlabelled row
    elif task == "multiclass":
        y = s.argmax(1).astype(np.float32)
        y[::9] = np.nan
    elif task == "regression":
        y = s[:, :1].astype(np.float32)
    else:  # survival: higher score -> earlier event
        rng = np.random.default_rng(seed)
        t = rng.exponential(np.exp(-s[:, 0]))
        y = np.stack([t, (rng.random(n) < 0.8).astype(float)], 1).astype(np.float32)
    return feats, y


def _glori(task="multilabel", findings=("a", "b", "c"), dropout=0.1):
    return GloriHead(list(findings), 2, task, embed_dim=D, decoder_dim=16, num_heads=2, ffn_dim=16, dropout=dropout)


def test_grid_selects_the_useful_learning_rate_and_sets_thresholds():
    ftr, ytr = _data(160, 0)
    fva, yva = _data(80, 1)
    res = fit_heads(lambda: LinearHead(["a", "b", "c"], 2, embed_dim=D, avgpool=True), ftr, ytr, fva, yva,
                    lrs=[1e-7, 3e-2], weight_decays=[0.0, 1e-2], epochs=8, batch_size=32)
    assert len(res.configs) == 4 and res.metric == "macro_ap"
    assert res.config["lr"] == 3e-2
    by_lr = {c["lr"]: c["macro_ap"] for c in res.configs if c["weight_decay"] == 0.0}
    assert by_lr[3e-2] > by_lr[1e-7] + 0.1
    assert not torch.allclose(res.head.thresholds, torch.full((3,), 0.5))
    assert not res.head.training and res.val_predictions.shape == (80, 3)
    assert {h["config"] for h in res.history} == {0, 1, 2, 3} and len(res.history) == 4 * 8


@pytest.mark.parametrize("make", [lambda: _glori(dropout=0.0),
                                  lambda: MLPHead(["a", "b", "c"], 2, embed_dim=D, hidden_dim=16, dropout=0.0)])
def test_each_grid_config_trains_exactly_as_a_single_run(make):
    """The vmapped grid is an optimisation only: config g equals training that config alone."""
    ftr, ytr = _data(96, 0)
    kw = dict(epochs=3, batch_size=32, weight_decays=[1e-2], seed=3)
    torch.manual_seed(0)
    grid = fit_heads(make, ftr, ytr, lrs=[1e-4, 3e-3, 1e-2], return_all=True, **kw)
    alone = fit_heads(make, ftr, ytr, lrs=[3e-3], return_all=True, **kw)
    losses = {h["lr"]: h["train_loss"] for h in grid.history if h["epoch"] == 3}
    assert losses[3e-3] == pytest.approx(alone.history[-1]["train_loss"], rel=1e-5)
    mine, single = grid.heads[1].state_dict(), alone.heads[0].state_dict()
    for k in single:
        torch.testing.assert_close(mine[k], single[k], rtol=1e-3, atol=5e-5)  # Adam amplifies float noise a little
    # The configs really differ (same start, different learning rates).
    w = [dict(h.named_parameters()) for h in grid.heads]
    name = next(iter(w[0]))
    assert not torch.allclose(w[0][name], w[1][name]) and not torch.allclose(w[1][name], w[2][name])


def test_grid_heads_differ_and_best_state_is_kept_with_early_stopping():
    ftr, ytr = _data(128, 0)
    fva, yva = _data(64, 1)
    res = fit_heads(lambda: _glori(), ftr, ytr, fva, yva, lrs=[1e-2, 1.0], epochs=30, batch_size=32, patience=2)
    last_epoch = max(h["epoch"] for h in res.history)
    assert last_epoch < 30  # every config stopped improving
    for c in res.configs:
        assert 1 <= c["best_epoch"] <= last_epoch - 2 or c["best_epoch"] == last_epoch
    # The returned head reproduces its recorded best validation score (the snapshot, not the last weights).
    from chexfound.adapt.selection import task_metrics

    m = task_metrics("multilabel", yva, res.val_predictions, ["a", "b", "c"])
    assert m["macro_ap"] == pytest.approx(res.config["macro_ap"], rel=1e-5)


def test_flip_augmentation_needs_flipped_features():
    ftr, ytr = _data(32, 0)
    with pytest.raises(ValueError, match="flipped"):
        fit_heads(lambda: _glori(), ftr, ytr, lrs=[1e-3], epochs=1, flip_augment=True)
    src = TensorFeatures(ftr, flipped=tuple((p.flip(1), c) for p, c in ftr))
    res = fit_heads(lambda: _glori(), src, ytr, lrs=[1e-3], epochs=1, flip_augment=True)
    assert res.head.out_dim == 3


@pytest.mark.parametrize("task,metric,floor", [("multiclass", "macro_ap", 0.6), ("regression", "r2", 0.5),
                                               ("survival", "c_index", 0.65)])
def test_other_tasks_learn(task, metric, floor):
    ftr, ytr = _data(256, 0, task)
    fva, yva = _data(128, 1, task)
    findings = {"multiclass": ("a", "b", "c"), "regression": ("score",), "survival": ("risk",)}[task]
    res = fit_heads(lambda: LinearHead(list(findings), 2, task, embed_dim=D, avgpool=True), ftr, ytr, fva, yva,
                    lrs=[1e-2, 5e-2], epochs=15, batch_size=64)
    assert res.metric == metric and res.config[metric] > floor
    if task == "regression":
        # Predictions come back on the target's scale (the head stores the training mean/std).
        assert abs(np.nanmean(res.val_predictions) - np.nanmean(yva)) < 0.5 * np.nanstd(yva)


def test_uncertain_labels_follow_the_policy():
    ftr, ytr = _data(64, 0)
    y_unc = ytr.copy()
    y_unc[::3, 0] = -1
    kw = dict(lrs=[1e-2], epochs=2, batch_size=32, return_all=True)
    make = lambda: LinearHead(["a", "b", "c"], 2, embed_dim=D)  # noqa: E731
    as_nan = fit_heads(make, ftr, np.where(y_unc == -1, np.nan, y_unc), **kw)
    ignored = fit_heads(make, ftr, y_unc, uncertain="nan", **kw)
    as_one = fit_heads(make, ftr, y_unc, uncertain="one", **kw)
    w = lambda r: r.heads[0].linear.weight  # noqa: E731
    torch.testing.assert_close(w(ignored), w(as_nan))
    assert not torch.allclose(w(as_one), w(as_nan))


@pytest.mark.slow  # trains 13 heads one by one to compare with the grid
def test_the_13_lr_grid_is_13_separately_trained_heads():
    """The original's 13-value grid runs as one batched computation (stacked parameters, vmapped forward,
    one AdamW over the stack); every config ends where training it alone ends.

    One exception, by the mathematics rather than the grid: attention's key bias has an exactly zero
    gradient (softmax ignores a constant added to every score), so Adam turns the float noise of that zero
    into steps of size lr; it never changes an output, and outputs are what is compared for it."""
    from chexfound.adapt.fit import DEFAULT_LRS

    ftr, ytr = _data(64, 0)
    fva, yva = _data(32, 1)
    kw = dict(epochs=2, batch_size=32, weight_decays=[1e-3], seed=5, return_all=True)
    make = lambda: _glori(dropout=0.0)  # noqa: E731
    grid = fit_heads(make, ftr, ytr, fva, yva, lrs=DEFAULT_LRS, **kw)
    assert len(grid.heads) == 13
    for g, lr in enumerate(DEFAULT_LRS):
        alone = fit_heads(make, ftr, ytr, fva, yva, lrs=[lr], **kw)
        mine, single = grid.heads[g].state_dict(), alone.heads[0].state_dict()
        for k in single:
            a, b = mine[k], single[k]
            if k.endswith("multihead_attn.in_proj_bias"):  # [q; k; v]: drop the key third
                a, b = torch.cat([a[:16], a[32:]]), torch.cat([b[:16], b[32:]])
            torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-5, msg=f"lr {lr}: {k}")
        with torch.no_grad():
            out_grid = grid.heads[g](fva)[0]
            out_alone = alone.heads[0](fva)[0]
        torch.testing.assert_close(out_grid, out_alone, rtol=1e-4, atol=1e-4)
        assert grid.configs[g]["best_epoch"] == alone.configs[0]["best_epoch"]
        assert grid.configs[g]["macro_ap"] == pytest.approx(alone.configs[0]["macro_ap"], abs=1e-4)


def test_thresholds_record_their_rule_and_survive_the_head_file(tmp_path):
    from chexfound.adapt.heads.base import load_our_head, save_head
    from chexfound.stats.thresholds import METHODS

    ftr, ytr = _data(160, 0)
    fva, yva = _data(80, 1)
    res = fit_heads(lambda: LinearHead(["a", "b", "c"], 2, embed_dim=D, avgpool=True), ftr, ytr, fva, yva,
                    lrs=[3e-2], epochs=4, batch_size=32)
    rules = res.head.threshold_rules
    assert [r["finding"] for r in rules] == ["a", "b", "c"]
    assert all(r["rule"] in METHODS and r["reason"] and r["n_val"] > 0 for r in rules)
    np.testing.assert_allclose([r["threshold"] for r in rules], res.head.thresholds.numpy(), rtol=1e-6)
    save_head(res.head, tmp_path / "h.safetensors")
    head, meta = load_our_head(tmp_path / "h.safetensors")
    assert meta["threshold_rules"] == rules and head.threshold_rules == rules


def test_grid_configs_equal_heads_trained_alone_with_torch_adamw():
    """Independent of the grid's own code path: each config of a HeadGrid step by step equals a plain head
    trained alone by torch.optim.AdamW (weight decay on matrices only), on the same batches."""
    from chexfound.adapt.grid import HeadGrid
    from chexfound.adapt.losses import build_loss

    ftr, ytr = _data(96, 0)
    torch.manual_seed(0)
    template = _glori(dropout=0.0)
    lrs, wds = [1e-3, 3e-3, 1e-2], [1e-2, 0.0, 1e-1]
    grid = HeadGrid(template, lrs, wds)
    loss_fn = build_loss("multilabel", "bce", ytr, 3)
    y = torch.as_tensor(ytr)
    alone = []
    for lr, wd in zip(lrs, wds):
        head = _glori(dropout=0.0)
        head.load_state_dict(template.state_dict())
        head.train()
        params = [p for p in head.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": wd},
                                 {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=lr)
        alone.append((head, opt))
    for step in range(4):
        rows = torch.arange(step * 24, step * 24 + 24)
        feats = tuple((p[rows], c[rows]) for p, c in ftr)
        grid.train_step(feats, y[rows], loss_fn, 1.0)
        for head, opt in alone:
            opt.zero_grad()
            loss_fn(head(feats)[0], y[rows]).backward()
            opt.step()
    for g, (head, _) in enumerate(alone):
        mine, single = grid.extract(g).state_dict(), head.state_dict()
        for k in single:
            a, b = mine[k], single[k]
            if k.endswith("multihead_attn.in_proj_bias"):  # the key bias: zero gradient, see the 13-lr test
                a, b = torch.cat([a[:16], a[32:]]), torch.cat([b[:16], b[32:]])
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"config {g}: {k}")


def test_the_cpu_loop_step_equals_the_vmapped_step():
    """The per-config loop (the CPU default) and the vmapped step (GPUs) train the same heads."""
    from chexfound.adapt.grid import HeadGrid
    from chexfound.adapt.losses import build_loss

    ftr, ytr = _data(64, 0)
    torch.manual_seed(0)
    template = _glori(dropout=0.0)
    loss_fn = build_loss("multilabel", "bce", ytr, 3)
    grids = [HeadGrid(template, [1e-3, 1e-2], [1e-2, 0.0], loop=loop) for loop in (True, False)]
    y = torch.as_tensor(ytr)
    for step in range(3):
        rows = torch.arange(step * 20, step * 20 + 20)
        feats = tuple((p[rows], c[rows]) for p, c in ftr)
        losses = [g.train_step(feats, y[rows], loss_fn, 0.5) for g in grids]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for c in range(2):
        a, b = grids[0].extract(c).state_dict(), grids[1].extract(c).state_dict()
        for k in a:
            if k.endswith("multihead_attn.in_proj_bias"):  # the key bias: zero gradient, see the 13-lr test
                a[k], b[k] = torch.cat([a[k][:16], a[k][32:]]), torch.cat([b[k][:16], b[k][32:]])
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
