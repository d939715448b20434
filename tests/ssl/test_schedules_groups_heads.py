import math

import numpy as np
import pytest
import torch

from chexfound.errors import ConfigError

from chexfound.ssl.config import load_config
from chexfound.ssl.heads import DINOHead, prenorm_stats
from chexfound.ssl.meta_arch import SSLMetaArch
from chexfound.ssl.param_groups import build_param_groups, layer_id
from chexfound.ssl.schedules import CosineSchedule, LinearWarmupConstant, build_schedules, scaled_lr


def _dinov2_array(base, final, total, warmup=0, start=0.0, freeze=0):
    """DINOv2's CosineScheduler, written as arrays (the reference)."""
    iters = np.arange(total - warmup - freeze)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((np.zeros(freeze), np.linspace(start, base, warmup), cos))


def test_cosine_schedule_matches_array_reference():
    for kw in ({}, {"warmup": 7}, {"warmup": 5, "freeze": 4}, {"warmup": 1}):
        ref = _dinov2_array(0.5, 0.01, 40, **kw)
        s = CosineSchedule(0.5, 0.01, 40, **kw)
        np.testing.assert_allclose([s(i) for i in range(40)], ref, rtol=1e-12, atol=1e-15)
        assert s(40) == 0.01 and s(1000) == 0.01
    tt = LinearWarmupConstant(0.04, 0.07, 10)
    np.testing.assert_allclose([tt(i) for i in range(12)], list(np.linspace(0.04, 0.07, 10)) + [0.07, 0.07])


def test_lr_sqrt_scaling_and_built_schedules():
    assert math.isclose(scaled_lr(2e-4, 8 * 14, "sqrt_wrt_1024"), 2e-4 * math.sqrt(112 / 1024))
    cfg = load_config("chexfound_vitl16_512")
    s = build_schedules(cfg, 1e-4, total=1000, epoch_length=10)
    assert s.lr(0) == 0.0 and math.isclose(s.lr(99), 1e-4)  # 10 warm-up epochs
    assert all(s.last_layer_lr(i) == 0.0 for i in range(10))  # frozen for 1 epoch
    assert s.last_layer_lr(20) > 0
    assert math.isclose(s.wd(0), 0.04) and math.isclose(s.wd(1000), 0.2)
    assert math.isclose(s.momentum(0), 0.994) and s.momentum(1000) == 1.0
    assert math.isclose(s.teacher_temp(0), 0.04) and math.isclose(s.teacher_temp(300), 0.07)


def _tiny_cfg(**over):
    items = ["student.arch=tiny_vit", "dino.head_n_prototypes=32", "dino.head_hidden_dim=16",
             "dino.head_bottleneck_dim=8", "ibot.head_n_prototypes=24", "ibot.head_hidden_dim=16",
             "ibot.head_bottleneck_dim=8", "crops.global_crops_size=32", "crops.local_crops_size=16"]
    items += [f"{k}={v}" for k, v in over.items()]
    return load_config(None, items)


def test_param_groups_rules():
    cfg = _tiny_cfg(**{"optim.layerwise_decay": 0.5, "ibot.separate_head": "true"})
    meta = SSLMetaArch(cfg)
    groups = build_param_groups(meta.student.named_parameters(), 2, cfg)
    rules = {n: g for g in groups for n in g["names"]}
    for n, g in rules.items():
        leaf = n.rsplit(".", 1)[-1]
        no_decay = n.endswith(".bias") or "norm" in n or leaf == "gamma" or leaf in (
            "cls_token", "pos_embed", "register_tokens", "mask_token")
        assert (g["wd_multiplier"] == 0.0) == no_decay, n
        assert g["is_last_layer"] == ("last_layer" in n)
    assert rules["backbone.patch_embed.proj.weight"]["lr_multiplier"] == 0.5**3 * 0.2
    assert rules["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == 0.5**2
    assert rules["backbone.blocks.1.attn.qkv.weight"]["lr_multiplier"] == 0.5
    assert rules["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    assert "dino_head.last_layer.weight_g" not in rules  # frozen at 1
    assert layer_id("backbone.norm.weight", 2) == 3
    orig = _tiny_cfg(**{"optim.no_decay_tokens": "false"})
    groups = build_param_groups(SSLMetaArch(orig).student.named_parameters(), 2, orig)
    assert {n: g for g in groups for n in g["names"]}["backbone.pos_embed"]["wd_multiplier"] == 1.0


def test_dino_head_layout_and_cosine_scores():
    h = DINOHead(64, 100, hidden_dim=32, bottleneck_dim=16, nlayers=3)
    keys = set(h.state_dict())
    assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.weight_g", "last_layer.weight_v"} <= keys
    assert h.last_layer.weight_g.shape == (100, 1) and h.last_layer.weight_v.shape == (100, 16)
    assert not h.last_layer.weight_g.requires_grad
    h.last_layer.weight_v.data.mul_(7.0)  # the scale of v must not matter
    z = h(torch.randn(5, 64))
    assert z.shape == (5, 100) and z.abs().max() <= 1.0 + 1e-5


def test_teacher_starts_as_student_without_drop_path():
    cfg = _tiny_cfg(**{"student.drop_path_rate": 0.3})
    meta = SSLMetaArch(cfg)
    assert all(torch.equal(a, b) for a, b in zip(meta.teacher.state_dict().values(), meta.student.state_dict().values()))
    assert meta.vit_config.drop_path_rate == 0.0 and meta.student.backbone.cfg.drop_path_rate == 0.3
    assert not any(p.requires_grad for p in meta.teacher.parameters())
    meta.student.backbone.cls_token.data.add_(1.0)
    meta.update_teacher(0.9)
    diff = meta.teacher.backbone.cls_token - meta.student.backbone.cls_token
    torch.testing.assert_close(diff, torch.full_like(diff, -0.9))


def test_masked_ema_is_a_lerp_on_both_paths():
    from chexfound.ssl.meta_arch import foreach_lerp_tensor_weight_

    g = torch.Generator().manual_seed(0)
    src = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    start = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    for grouped in (True, False):
        for w in (0.25, 0.0):
            t = [x.clone() for x in start]
            foreach_lerp_tensor_weight_(t, src, torch.tensor(w), grouped=grouped)
            for a, s0, s in zip(t, start, src):
                torch.testing.assert_close(a, s0 + w * (s - s0))
            if w == 0.0:
                assert all(torch.equal(a, s0) for a, s0 in zip(t, start))  # a skipped step: untouched


def test_warmup_and_freeze_in_iterations_win_over_epochs():
    cfg = load_config("chexfound_vitl16_512", ["optim.warmup_iterations=30", "optim.freeze_last_layer_iterations=7"])
    s = build_schedules(cfg, 1e-3, total=200, epoch_length=50)  # 10 warm-up epochs would be all 200
    ref = _dinov2_array(1e-3, cfg["optim"]["min_lr"], 200, warmup=30)
    np.testing.assert_allclose([s.lr(i) for i in range(200)], ref, rtol=1e-12, atol=1e-15)
    assert all(s.last_layer_lr(i) == 0.0 for i in range(7)) and s.last_layer_lr(7) == 0.0 < s.last_layer_lr(8)
    # longer than the run: capped at the run
    s = build_schedules(load_config(None, ["optim.warmup_iterations=500"]), 1e-3, total=100, epoch_length=10)
    assert s.lr.warmup == 100 and math.isclose(s.lr(50), 1e-3 * 50 / 99)
    with pytest.raises(ConfigError):
        load_config(None, ["optim.warmup_iterations=2.5"])


def test_prenorm_stats_flag_a_head_that_maps_everything_to_one_vector():
    torch.manual_seed(0)
    spread = prenorm_stats(torch.randn(400, 16))
    assert spread["head_alignment"] < 0.1 and math.isclose(float(spread["head_prenorm_norm"]), 4.0, rel_tol=0.1)
    same = prenorm_stats(torch.randn(1, 16).expand(400, 16) * 3.0 + 1e-3 * torch.randn(400, 16))
    assert same["head_alignment"] > 0.999


def test_fp32_head_runs_outside_autocast_with_the_same_state_dict():
    torch.manual_seed(0)
    h32 = DINOHead(64, 100, hidden_dim=32, bottleneck_dim=16, fp32=True)
    h = DINOHead(64, 100, hidden_dim=32, bottleneck_dim=16)
    h.load_state_dict(h32.state_dict())
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z32, z16 = h32(x.bfloat16()), h(x.bfloat16())
    assert z32.dtype == torch.float32 and z16.dtype == torch.bfloat16
    torch.testing.assert_close(z32, h32(x.bfloat16().float()))  # exactly the fp32 computation
    h.record_prenorm = True
    h(x)
    assert set(h.prenorm_stats) == {"head_prenorm_norm", "head_alignment"}
    meta = SSLMetaArch(_tiny_cfg(**{"dino.head_precision": "fp32", "ibot.separate_head": "true"}))
    assert meta.student.dino_head.fp32 and meta.student.ibot_head.fp32 and not SSLMetaArch(_tiny_cfg()).student.dino_head.fp32


def test_centred_head_removes_the_common_part_of_its_rows():
    torch.manual_seed(0)
    plain = DINOHead(32, 50, hidden_dim=16, bottleneck_dim=8)
    centred = DINOHead(32, 50, hidden_dim=16, bottleneck_dim=8, center=True)
    centred.load_state_dict(plain.state_dict())
    x = torch.randn(1, 32).expand(64, 32) * 5.0 + 0.01 * torch.randn(64, 32)  # one shared vector + tiny noise
    # Without centring every row scores the prototypes alike (uniform Sinkhorn-Knopp targets follow);
    # centred, the rows keep only what differs between them, normalised to the full cosine range.
    assert plain(x).std(dim=0).mean() < 0.01 < 0.1 < centred(x).std(dim=0).mean()
    z = centred.mlp(x)
    u = torch.nn.functional.normalize(z - z.mean(dim=0, keepdim=True), dim=-1)
    torch.testing.assert_close(centred(x), centred.last_layer(u))
    assert centred(x[:1]).shape == (1, 50)  # one row: nothing to centre against, left as is
    assert SSLMetaArch(_tiny_cfg(**{"dino.head_center": "true"})).teacher.dino_head.center


def test_centred_head_centres_each_part_of_a_shared_call_over_its_real_rows():
    """A shared head scores [CLS tokens; masked-patch buffer] in one call: each part is centred on its own, and
    the buffer's padding rows (whatever they hold) do not move its mean."""
    torch.manual_seed(0)
    head = DINOHead(32, 50, hidden_dim=16, bottleneck_dim=8, center=True)
    cls, patches = torch.randn(6, 32) + 3.0, torch.randn(10, 32) - 2.0
    valid = torch.arange(10) < 7  # 3 padding rows
    want = torch.cat([head(cls), head(patches[:7])])
    for pad in (patches[7:], 100 * torch.randn(3, 32)):
        x = torch.cat([cls, patches[:7], pad])
        got = head(x, [6, 10], torch.cat([torch.ones(6, dtype=torch.bool), valid]))
        torch.testing.assert_close(torch.cat([got[:6], got[6:13]]), want)
        torch.testing.assert_close(head(torch.cat([patches[:7], pad]), valid=valid)[:7], head(patches[:7]))
