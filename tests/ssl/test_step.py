"""The training step: no host sync, the same model as the old step, non-finite steps skipped
on the device, padding of the masked-patch buffer invisible, torch.compile equal to eager."""

from __future__ import annotations

import pytest
import torch

from chexfound.ssl import distributed as D
from chexfound.ssl.timing import SyncCounter, seconds_per_item
from chexfound.ssl.trainer import Trainer


def _trainer(tiny_config, *extra: str, reference: bool = False) -> Trainer:
    cfg = tiny_config("train.batch_size_per_gpu=4", *extra)
    t = Trainer(cfg, D.DistInfo(), reference=reference)
    t.set_schedules(20, 5)
    return t


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _learned_state(t: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in t.meta.state_dict().items()}
    for i, st in enumerate(t.optimizer.state.values()):
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v.detach().clone()
    return out


def test_the_step_never_waits_for_the_device(tiny_config):
    t = _trainer(tiny_config, "student.drop_path_rate=0.3")  # > 0.1: the batch-subset stochastic depth too
    t.augment.static_shapes = True  # what runs on a GPU (on the CPU the blur indexes its subset: no cost there)
    t.train_step(0, _images())  # optimizer state created outside the check
    for dtype in ("fp32", "bf16"):
        t.cfg["train"]["dtype"] = dtype
        t.amp_dtype = None if dtype == "fp32" else torch.bfloat16
        with SyncCounter() as det:
            stats = t.train_step(1, _images(seed=1))
        assert det.total == 0, f"{dtype}: host syncs in the step: {dict(det.counts)}"
    assert {"nonfinite", "first_nonfinite_iteration", "masked_patches", "grad_norm"} <= set(stats)
    # The reference step syncs (that is what it is for): the detector does see it.
    ref = _trainer(tiny_config, reference=True)
    with SyncCounter() as det:
        ref.train_step(0, _images())
    assert det.counts["_local_scalar_dense"] >= 1


def test_fast_step_trains_the_same_model_as_the_reference_step(tiny_config):
    """Same batches (masks included) -> same losses and weights, to float tolerance: fused AdamW vs the
    for-loop AdamW, the lerp EMA vs mul + add, sync-free Sinkhorn-Knopp, the padded masked-patch buffer.
    KoLeo is off: at this tiny model's init the CLS tokens nearly coincide and its gradient (~1/distance)
    turns rounding differences into visible ones (its code is the same in both steps)."""
    no_koleo = "dino.koleo_loss_weight=0"
    fast, ref = _trainer(tiny_config, no_koleo), _trainer(tiny_config, no_koleo, reference=True)
    for step in range(4):
        batch = fast.make_batch(step, _images(seed=step))
        assert batch["mask_idx"].shape[0] > int(batch["n_masked"])  # the buffer has padding rows
        a = fast.train_on_batch(step, batch)
        b = ref.train_on_batch(step, batch)
        for k in ("loss", "dino_local_loss", "dino_global_loss", "ibot_loss", "grad_norm"):
            torch.testing.assert_close(a[k], b[k], rtol=2e-5, atol=1e-6, msg=f"step {step}: {k}")
    sa, sb = fast.meta.state_dict(), ref.meta.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6, msg=k)
    assert float(a["nonfinite"]) == 0 and float(a["first_nonfinite_iteration"]) == -1


@pytest.mark.parametrize("extra", [(), ("dino.head_center=true", "ibot.separate_head=false"),
                                   ("dino.head_center=true", "ibot.separate_head=true")])
def test_padding_of_the_masked_patch_buffer_changes_nothing(tiny_config, extra):
    # (a centred head, shared or not, centres the patch rows over the real ones only)
    from chexfound.ssl.masking import gather_masked

    exact, padded = _trainer(tiny_config, *extra), _trainer(tiny_config, *extra)
    for step in range(2):
        batch = padded.make_batch(step, _images(seed=step))
        mp = gather_masked(batch["masks"], max(1, int(batch["n_masked"])))  # no padding
        tight = {**batch, "mask_idx": mp.idx, "mask_weight": mp.weight, "mask_valid": mp.valid, "n_masked": mp.count}
        a, b = exact.train_on_batch(step, tight), padded.train_on_batch(step, batch)
        for k in ("loss", "ibot_loss", "grad_norm"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_a_non_finite_step_changes_nothing_and_is_reported(tiny_config, centering):
    t = _trainer(tiny_config, f"centering={centering}")
    t.train_step(0, _images())
    before = _learned_state(t)
    real = t.meta.forward_losses

    def poisoned(*a, **kw):
        loss, stats = real(*a, **kw)
        return loss * float("nan"), stats

    t.meta.forward_losses = poisoned  # type: ignore[method-assign]
    stats = t.train_step(1, _images(seed=1))
    t.train_step(2, _images(seed=2))
    after = _learned_state(t)
    for k, v in before.items():
        if k.endswith("center"):  # the softmax centre follows finite teacher scores (not a weight)
            assert torch.isfinite(after[k]).all(), k
            continue
        assert torch.equal(v, after[k]), f"{k} changed on a skipped step"
    assert float(stats["nonfinite"]) == 1 and float(stats["first_nonfinite_iteration"]) == 1
    # A finite step afterwards trains again.
    t.meta.forward_losses = real  # type: ignore[method-assign]
    good = t.train_step(3, _images(seed=3))
    assert float(good["nonfinite"]) == 2  # counted since the trainer was built
    assert any(not torch.equal(before[k], v) for k, v in _learned_state(t).items() if k.startswith("model.teacher"))
    t.load_state(t.state())  # a restored trainer (a rollback, a resume) counts afresh
    assert float(t.train_step(4, _images(seed=4))["nonfinite"]) == 0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inductor's internals
def test_compiled_step_equals_eager(tiny_config):
    """train.compile (blocks and heads, inductor on the CPU) gives the eager step's losses (one step: the
    compile of ~10 graphs takes most of a minute here)."""
    one_head = "ibot.separate_head=false"
    eager, comp = _trainer(tiny_config, one_head), _trainer(tiny_config, one_head, "train.compile=true")
    for step in range(1):
        batch = eager.make_batch(step, _images(seed=step))
        a, b = eager.train_on_batch(step, batch), comp.train_on_batch(step, batch)
        for k in ("loss", "dino_local_loss", "ibot_loss", "koleo_loss", "grad_norm"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"step {step}: {k}")


def test_compile_mode_is_checked(tiny_config):
    from chexfound.errors import ConfigError

    with pytest.raises(ConfigError, match="train.compile"):
        _trainer(tiny_config, "train.compile=fastest")


def test_seconds_per_item_skips_the_warm_up_and_grows_the_batch_until_it_is_measurable():
    t, calls = [0.0], []

    def run(n: int) -> None:  # 0.1 s per item, and a slow first call (allocator, kernel selection)
        calls.append(n)
        t[0] += 0.1 * n + (5.0 if len(calls) == 1 else 0.0)

    cpu = torch.device("cpu")
    assert seconds_per_item(run, 64, lambda: t[0], cpu) == pytest.approx(0.1)
    assert calls == [4, 4, 8]  # warm-up, 0.4 s (too short to trust), 0.8 s
    calls.clear()
    assert seconds_per_item(run, 6, lambda: t[0], cpu, min_s=100.0) == pytest.approx(0.1)
    assert calls == [4, 4, 6]  # never more than n_max items
