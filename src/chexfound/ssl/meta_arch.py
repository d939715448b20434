"""Student and EMA teacher, and one DINO + iBOT + KoLeo step (DINOv2's SSLMetaArch, without xFormers).

Student and teacher are `SSLModel`s {backbone, dino_head, ibot_head?}; the teacher starts as a copy of the
student (without stochastic depth), never gets gradients, and follows it by EMA.

Global and local crops run as two backbone calls (different sequence lengths; no padding to one batch and no
block-diagonal nested tensors, which need xFormers). Masked patches come as a buffer of fixed length with a
validity weight (`chexfound.ssl.masking.gather_masked`), so no shape in a step depends on the data and
nothing waits for the device. Loss normalisation follows DINOv2 exactly:
  n_terms = 2 (global-global, each student global crop vs the *other* teacher global crop) + 2 * n_local
  dino = (sum over local x teacher-global terms + sum over the 2 global-global terms) / n_terms
  ibot = mean over global crops of (mean CE over that crop's masked patches), 0 for unmasked crops
  koleo = sum over the 2 global-crop chunks of KoLeo(student backbone CLS tokens)
  loss = w_dino * dino + w_ibot * ibot + w_koleo * koleo
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from chexfound.models import VisionTransformer
from chexfound.models.config import ViTConfig
from chexfound.models.loaders.run_config import config_from_run
from chexfound.ssl import distributed as D
from chexfound.ssl.centering import SoftmaxCentering, sinkhorn_knopp
from chexfound.ssl.heads import DINOHead
from chexfound.ssl.losses import dino_cls_loss, ibot_patch_loss, koleo_loss
from chexfound.ssl.masking import gather_masked


def backbone_config(cfg: dict[str, Any], drop_path: bool = True) -> ViTConfig:
    """The student's ViTConfig: registry entry + overrides, img_size = global crop size, named after the preset
    when the overrides change it (the same reader `chexfound convert` uses on a run's config.yaml)."""
    s = cfg["student"]
    vit = config_from_run(cfg)
    return replace(
        vit,
        drop_path_rate=float(s["drop_path_rate"]) if drop_path else 0.0,
        drop_path_uniform=bool(s["drop_path_uniform"]),
    )


class SSLModel(nn.Module):
    """{backbone, dino_head, ibot_head (only with a separate iBOT head)}; forward runs the student side."""

    def __init__(self, backbone: VisionTransformer, dino_head: DINOHead, ibot_head: DINOHead | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def forward(self, global_crops: Tensor, local_crops: Tensor | None, masks: Tensor | None,
                mask_idx: Tensor | None, teacher: bool = False, mask_valid: Tensor | None = None) -> dict[str, Tensor]:
        # One entry point for both roles: FSDP2 hooks only wrap `forward`. `mask_valid` marks the real rows of
        # the masked-patch buffer (a centred head must not count its padding rows).
        if teacher:
            return self._teacher_scores(global_crops, mask_idx, mask_valid)
        assert local_crops is not None
        g = self.backbone.forward_features(global_crops, masks=masks)
        cls_g = g["x_norm_clstoken"]
        n_local = local_crops.shape[0]
        cls_l = self.backbone.forward_features(local_crops)["x_norm_clstoken"] if n_local else cls_g[:0]
        out: dict[str, Tensor] = {"cls_global": cls_g}
        patches = None
        if mask_idx is not None:
            # A fixed-size buffer (padding rows weigh 0): even a batch without masked patches scores rows, so
            # every parameter joins the graph, which DDP requires.
            patches = g["x_norm_patchtokens"].flatten(0, 1)[mask_idx]
        if self.ibot_head is None and patches is not None:
            # One head call for all tokens (shared head), split afterwards.
            n_cls = cls_l.shape[0] + cls_g.shape[0]
            z = self.dino_head(torch.cat([cls_l, cls_g, patches]), [n_cls, patches.shape[0]],
                               _rows_valid(n_cls, mask_valid, patches))
            out["dino_local"], out["dino_global"], out["ibot"] = z.split(
                [cls_l.shape[0], cls_g.shape[0], patches.shape[0]])
        else:
            z = self.dino_head(torch.cat([cls_l, cls_g]))
            out["dino_local"], out["dino_global"] = z.split([cls_l.shape[0], cls_g.shape[0]])
            if patches is not None and self.ibot_head is not None:
                out["ibot"] = self.ibot_head(patches, valid=mask_valid)
        return out

    @torch.no_grad()
    def _teacher_scores(self, global_crops: Tensor, mask_idx: Tensor | None,
                        mask_valid: Tensor | None = None) -> dict[str, Tensor]:
        """Teacher side: prototype scores of the global CLS tokens (views swapped) and masked patches."""
        g = self.backbone.forward_features(global_crops)
        cls = g["x_norm_clstoken"]
        c1, c2 = cls.chunk(2)
        cls = torch.cat([c2, c1])  # student view 1 learns from teacher view 2 and vice versa
        out: dict[str, Tensor] = {}
        if mask_idx is not None:
            patches = g["x_norm_patchtokens"].flatten(0, 1)[mask_idx]
            if self.ibot_head is None:
                z = self.dino_head(torch.cat([cls, patches]), [cls.shape[0], patches.shape[0]],
                                   _rows_valid(cls.shape[0], mask_valid, patches))
                out["dino"], out["ibot"] = z.split([cls.shape[0], patches.shape[0]])
            else:
                out["dino"], out["ibot"] = self.dino_head(cls), self.ibot_head(patches, valid=mask_valid)
        else:
            out["dino"] = self.dino_head(cls)
        return out


def _rows_valid(n_cls: int, mask_valid: Tensor | None, patches: Tensor) -> Tensor | None:
    """Which rows of a shared head's [CLS tokens; masked-patch buffer] call are real."""
    if mask_valid is None:
        return None
    return torch.cat([mask_valid.new_ones(n_cls), mask_valid.to(torch.bool).reshape(patches.shape[0])])


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        vit_s = backbone_config(cfg, drop_path=True)
        self.vit_config = backbone_config(cfg, drop_path=False)  # the teacher's (and exported) config
        d, i = cfg["dino"], cfg["ibot"]
        self.ibot_enabled = float(i["loss_weight"]) > 0
        separate = self.ibot_enabled and bool(i["separate_head"])

        def heads() -> tuple[DINOHead, DINOHead | None]:
            kw = {"fp32": d.get("head_precision", "autocast") == "fp32", "center": bool(d.get("head_center", False))}
            dh = DINOHead(vit_s.embed_dim, d["head_n_prototypes"], d["head_hidden_dim"],
                          d["head_bottleneck_dim"], d["head_nlayers"], **kw)
            ih = (DINOHead(vit_s.embed_dim, i["head_n_prototypes"], i["head_hidden_dim"],
                           i["head_bottleneck_dim"], i["head_nlayers"], **kw) if separate else None)
            return dh, ih

        self.student = SSLModel(VisionTransformer(vit_s), *heads())
        self.teacher = SSLModel(VisionTransformer(self.vit_config), *heads())
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.dino_head.record_prenorm = True  # head_prenorm_norm / head_alignment in the stats
        if not self.ibot_enabled:
            # Never used without masking; a parameter without gradient would stall DDP.
            self.student.backbone.mask_token.requires_grad_(False)
        n_ibot = i["head_n_prototypes"] if separate else d["head_n_prototypes"]
        self.dino_center = SoftmaxCentering(d["head_n_prototypes"], cfg["center_momentum"])
        self.ibot_center = SoftmaxCentering(n_ibot, cfg["center_momentum"])
        self._student_runner: Callable[..., dict[str, Tensor]] | None = None
        self._ema_lists: tuple[list[Tensor], list[Tensor]] | None = None

    # -- wiring ------------------------------------------------------------------------------------
    def set_student_runner(self, runner: Callable[..., dict[str, Tensor]] | None) -> None:
        """The (DDP-wrapped) student used for the forward pass; stored unregistered (no duplicate params)."""
        object.__setattr__(self, "_student_runner", runner)

    def run_student(self, *args: Any) -> dict[str, Tensor]:
        return (self._student_runner or self.student)(*args)

    def student_submodules(self) -> dict[str, nn.Module]:
        out = {"backbone": self.student.backbone, "dino_head": self.student.dino_head}
        if self.student.ibot_head is not None:
            out["ibot_head"] = self.student.ibot_head
        return out

    @property
    def n_local(self) -> int:
        return int(self.cfg["crops"]["local_crops_number"])

    # -- targets -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _targets(self, scores: Tensor, center: SoftmaxCentering, temp: float, valid: Tensor | None = None) -> Tensor:
        if self.cfg["centering"] == "sinkhorn_knopp":
            return sinkhorn_knopp(scores, temp, int(self.cfg["sinkhorn_iterations"]), valid=valid)
        t = center.targets(scores, temp)
        center.update(scores, None if valid is None else valid.float())
        return t

    # -- one step ----------------------------------------------------------------------------------
    def forward_losses(self, batch: dict[str, Tensor], teacher_temp: float,
                       autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                       timer: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss (with graph) and detached per-term losses and teacher diagnostics."""
        tm = timer.section if timer is not None else (lambda name: contextlib.nullcontext())
        cfg = self.cfg
        g, loc = batch["global_crops"], batch["local_crops"]
        masks = batch.get("masks") if self.ibot_enabled else None
        mask_idx = mask_weight = mask_valid = n_masked = None
        if masks is not None:
            if "mask_idx" not in batch:  # a caller with bare masks: an exact-size buffer (this syncs)
                mp = gather_masked(masks, max(1, int(masks.sum())))
                batch = {**batch, "mask_idx": mp.idx, "mask_weight": mp.weight, "mask_valid": mp.valid,
                         "n_masked": mp.count}
            mask_idx, mask_weight = batch["mask_idx"], batch["mask_weight"]
            mask_valid, n_masked = batch["mask_valid"], batch["n_masked"]
        with tm("teacher"), autocast():
            ts = self.teacher(g, None, None, mask_idx, True, mask_valid)
            if hasattr(self.teacher, "reshard"):
                # FSDP2 keeps the root's parameters gathered after forward (expecting a backward); the
                # teacher has none, and its shards must line up with the student's for the EMA.
                self.teacher.reshard()
        with tm("centering"):
            dino_t = self._targets(ts["dino"], self.dino_center, teacher_temp)
            ibot_t = (self._targets(ts["ibot"], self.ibot_center, teacher_temp, mask_valid)
                      if "ibot" in ts else None)
        with tm("student"), autocast():
            so = self.run_student(g, loc, masks, mask_idx, False, mask_valid)
        with tm("loss"):
            st = float(cfg["student_temp"])
            n_l = self.n_local
            n_terms = 2 + max(2 * n_l, n_l)
            t_views = list(dino_t.chunk(2))
            dino_local = (dino_cls_loss(list(so["dino_local"].chunk(n_l)), t_views, st) / n_terms
                          if n_l else dino_t.new_zeros(()))
            dino_global = dino_cls_loss([so["dino_global"]], [dino_t], st) * 2 / n_terms
            koleo = sum(koleo_loss(c) for c in so["cls_global"].chunk(2))
            total = float(cfg["dino"]["loss_weight"]) * (dino_local + dino_global)
            total = total + float(cfg["dino"]["koleo_loss_weight"]) * koleo
            ibot = dino_t.new_zeros(())
            if masks is not None and ibot_t is not None:
                ibot = ibot_patch_loss(so["ibot"], ibot_t, masks, st, weights=mask_weight)
                total = total + float(cfg["ibot"]["loss_weight"]) * ibot
        with torch.no_grad():
            k = dino_t.shape[-1]
            dev = dino_t.device
            mean_p = dino_t.mean(dim=0)
            stats = {
                "loss": total.detach(),
                "dino_local_loss": dino_local.detach(),
                "dino_global_loss": dino_global.detach(),
                "ibot_loss": ibot.detach(),
                "koleo_loss": koleo.detach() if torch.is_tensor(koleo) else torch.full((), float(koleo), device=dev),
                "teacher_entropy": _entropy(dino_t).mean(),
                "teacher_mean_entropy": _entropy(mean_p),
                # distinct argmax prototypes, without a host sync (unique() would wait for the device)
                "prototypes_in_use": torch.zeros(k, device=dev).scatter_(0, dino_t.argmax(dim=-1), 1.0).sum(),
                "masked_patches": (n_masked.float() if n_masked is not None else torch.zeros((), device=dev)),
                # made on the device (a fill, not a copy from the host)
                "log_n_prototypes": torch.full((), math.log(k), device=dev),
                **self.teacher.dino_head.prenorm_stats,
            }
        return total, stats

    # -- teacher EMA -------------------------------------------------------------------------------
    def _paired_params(self) -> Iterator[tuple[Tensor, Tensor]]:
        t_params = dict(self.teacher.named_parameters())
        for name, p in self.student.named_parameters():
            yield t_params[name], p

    def _ema_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher, student) tensors for the EMA; built once (parameters are updated in place), except for
        FSDP2's DTensors, whose local shards are taken anew each time."""
        if self._ema_lists is not None:
            return self._ema_lists
        t_list, s_list, sharded = [], [], False
        for t, s in self._paired_params():
            # FSDP2 parameters are DTensors sharded identically for student and teacher: EMA the shards.
            sharded = sharded or hasattr(t, "to_local")
            t_list.append(t.to_local() if hasattr(t, "to_local") else t)
            s_list.append(s.to_local() if hasattr(s, "to_local") else s)
        if not sharded:
            self._ema_lists = (t_list, s_list)
        return t_list, s_list

    def forget_ema_pairs(self) -> None:
        """Call after parameters were replaced (not updated in place)."""
        self._ema_lists = None

    @torch.no_grad()
    def update_teacher(self, momentum: float, skip: Tensor | None = None) -> None:
        """teacher <- teacher + (1 - momentum) (student - teacher), over all parameters in a few foreach ops.
        `skip` (0-dim, 1.0 = skip): a step found non-finite leaves the teacher as it is, decided on the
        device (no host sync)."""
        t_list, s_list = self._ema_pairs()
        if skip is None:
            torch._foreach_lerp_(t_list, s_list, 1.0 - momentum)
            return
        foreach_lerp_tensor_weight_(t_list, s_list, (1.0 - skip.float()) * (1.0 - momentum))

    @torch.no_grad()
    def update_teacher_reference(self, momentum: float) -> None:
        """The old EMA update (lists rebuilt each step, mul + add): the reference step, `Trainer(reference=True)`."""
        t_list, s_list = [], []
        for t, s in self._paired_params():
            t_list.append(t.to_local() if hasattr(t, "to_local") else t)
            s_list.append(s.to_local() if hasattr(s, "to_local") else s)
        torch._foreach_mul_(t_list, momentum)
        torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)


def foreach_lerp_tensor_weight_(targets: list[Tensor], sources: list[Tensor], weight: Tensor,
                                grouped: bool | None = None) -> None:
    """targets[i] += weight * (sources[i] - targets[i]) with a 0-dim device tensor `weight` (so the host never
    reads it). `grouped` (default: off the CPU): three foreach ops whose operands have matching shapes (the
    GPU's multi-tensor fast path); otherwise one lerp per tensor (one pass over each, best on the CPU)."""
    if grouped is None:
        grouped = weight.device.type != "cpu"
    if not grouped:
        torch._foreach_lerp_(targets, sources, [weight] * len(targets))
        return
    delta = torch._foreach_sub(sources, targets)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(targets, delta)


def all_reduce_stats(stats: dict[str, Tensor], device: torch.device) -> dict[str, float]:
    """Mean over ranks of every scalar stat (one collective)."""
    keys = sorted(stats)
    v = torch.stack([stats[k].detach().float().to(device).reshape(()) for k in keys])
    D.all_reduce_mean(v)
    return {k: float(x) for k, x in zip(keys, v.tolist())}
