"""The ViT-scale recipe presets: the proxy is the proof's network and data at CPU size, the ViT-B
proof differs from the ViT-S one only where it says so, and the recipe's rules hold in each."""

import math

from chexfound.ssl.config import diff_configs, load_config
from chexfound.ssl.meta_arch import backbone_config
from chexfound.ssl.schedules import build_schedules, scaled_lr


def _peak_lr(cfg: dict) -> float:
    o = cfg["optim"]
    return scaled_lr(o["base_lr"], cfg["train"]["batch_size_per_gpu"], o["scaling_rule"])


def test_proxy_is_the_proof_network_and_data_at_cpu_size():
    proof, proxy = load_config("proof_vits16_224"), load_config("proxy_vits16_cpu")
    a, b = backbone_config(proof), backbone_config(proxy)
    assert (a.embed_dim, a.depth, a.num_heads, a.num_register_tokens, a.layerscale_init) == \
           (b.embed_dim, b.depth, b.num_heads, b.num_register_tokens, b.layerscale_init) == (384, 12, 6, 4, 0.1)
    assert proxy["data"]["sources"] == proof["data"]["sources"]
    assert proxy["crops"]["local_crops_number"] == proof["crops"]["local_crops_number"]
    assert proxy["probe"]["nih14"] == proof["probe"]["nih14"] and proxy["probe"]["final_random_seeds"] == 3
    # 300 fixed iterations with 50 of warm-up, at the largest per-step lr that held on the proxy (7.1e-4)
    assert math.isclose(_peak_lr(proxy), 0.004 * math.sqrt(32 / 1024))
    s = build_schedules(proxy, _peak_lr(proxy), total=300, epoch_length=30)
    assert s.lr.warmup == 50 and math.isclose(s.lr(49), _peak_lr(proxy))


def test_recipe_rules_in_every_vit_scale_preset():
    for name in ("proxy_vits16_cpu", "proof_vits16_224", "proof_vitb16_224", "cpu_vitti16_96"):
        c = load_config(name)
        rows = 2 * c["train"]["batch_size_per_gpu"]  # global-crop CLS rows per step
        assert c["dino"]["head_hidden_dim"] == 256 and c["dino"]["head_bottleneck_dim"] == 64, name
        assert c["dino"]["head_n_prototypes"] == 4 * rows, name  # K ~ 4 per row for Sinkhorn-Knopp
        assert c["teacher"]["teacher_temp"] == c["teacher"]["warmup_teacher_temp"] == 0.02, name
        assert c["centering"] == "sinkhorn_knopp" and not c["ibot"]["separate_head"], name
        assert _peak_lr(c) <= 7.1e-4 + 1e-9, name  # the drift started above ~1e-3 per step


def test_vitb_proof_differs_from_vits_proof_only_in_size_lr_and_drop_path():
    s, b = load_config("proof_vits16_224"), load_config("proof_vitb16_224")
    diff = set(diff_configs(s, b))
    assert diff == {"_preset", "student.overrides.embed_dim", "student.overrides.num_heads",
                    "student.drop_path_rate", "optim.base_lr"}
    vb = backbone_config(b)
    assert (vb.embed_dim, vb.num_heads, vb.depth) == (768, 12, 12)
    assert math.isclose(_peak_lr(s), 5e-4) and math.isclose(_peak_lr(b), 2.5e-4)
