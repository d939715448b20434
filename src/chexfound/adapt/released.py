"""Load the original CheXFound head checkpoints (`glori.pth` and linear-probe `model_final.pth`).

Layout (fvcore Checkpointer): `{"model": state_dict, "optimizer": ..., "scheduler": ..., "iteration": int}`,
state-dict keys `classifiers_dict.<name>.decoder.<param>` for GLoRI (ML-Decoder) and
`classifiers_dict.<name>.linear.{weight,bias}` for linear probes, where <name> looks like
`linear:blocks=4:avgpool=False:lr=0_0001000000`. A training run saves every head of its learning-rate grid in
one file; the best one is named in `results_eval_linear.json` beside it (a `{"best_classifier": {"name": ...}}`
line). Parameters are matched by the suffix after `decoder.`; sizes come from the tensor shapes.
The file is read with `torch.load(weights_only=True)`: it is never unpickled.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from chexfound.adapt.heads.base import Head
from chexfound.adapt.heads.glori import GloriHead
from chexfound.adapt.heads.linear import LinearHead
from chexfound.data.findings import CXRLT24
from chexfound.errors import CheckpointError

# ML-Decoder parameter -> our GloriHead parameter.
_DECODER_KEYS = {
    "embed_standart.weight": "embed.weight",
    "embed_standart.bias": "embed.bias",
    "query_embed.weight": "queries",
    "duplicate_pooling_bias": "class_bias",
}
for _n in ("norm1", "norm2", "norm3", "linear1", "linear2", "multihead_attn.out_proj"):
    for _p in ("weight", "bias"):
        _DECODER_KEYS[f"layers.0.{_n}.{_p}"] = f"layer.{_n}.{_p}"
_DECODER_KEYS["layers.0.multihead_attn.in_proj_weight"] = "layer.multihead_attn.in_proj_weight"
_DECODER_KEYS["layers.0.multihead_attn.in_proj_bias"] = "layer.multihead_attn.in_proj_bias"
_NAME_RE = re.compile(r"(?:^|.*\.)classifiers_dict\.(?P<name>.+?)\.(?P<kind>decoder|linear)\.(?P<param>.+)$")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    from chexfound.models.loaders.files import load_weights_only
    from chexfound.models.loaders.keys import unwrap_state_dict

    obj = load_weights_only(path)  # checks the bytes; pickled classes and truncated files are CheckpointErrors
    # fvcore {"model": state_dict, "optimizer": ..., "iteration": ...} or a bare state dict; non-tensors are dropped.
    return unwrap_state_dict(obj, path).tensors


def _group(sd: dict[str, Tensor]) -> dict[str, tuple[str, dict[str, Tensor]]]:
    """classifier name -> (kind, {param suffix: tensor})."""
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
    kinds: dict[str, str] = {}
    for key, t in sd.items():
        m = _NAME_RE.match(key)
        if m:
            groups[m["name"]][m["param"]] = t
            kinds[m["name"]] = m["kind"]
    if not groups:  # a bare ML-Decoder state dict (keys start at `embed_standart.` etc.)
        bare = {k.split("decoder.", 1)[-1]: v for k, v in sd.items()}
        if "embed_standart.weight" in bare:
            return {"decoder": ("decoder", bare)}
    return {n: (kinds[n], p) for n, p in groups.items()}


def _best_name(path: Path) -> str | None:
    """The `best_classifier` name from results_eval_linear.json beside the checkpoint (the last one logged)."""
    results = path.parent / "results_eval_linear.json"
    if not results.is_file():
        return None
    best = None
    for line in results.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("best_classifier"), dict):
            best = rec["best_classifier"].get("name", best)
    return best


def _pick(path: Path, groups: dict[str, Any], name: str | None) -> str:
    if name is None and len(groups) > 1:
        name = _best_name(path)
        if name is None:
            raise CheckpointError(path, f"{len(groups)} classifiers in the file and no results_eval_linear.json "
                                        f"beside it; pass name= one of {sorted(groups)}")
    if name is None:
        return next(iter(groups))
    for cand in (name, name.replace(".", "_")):
        if cand in groups:
            return cand
    raise CheckpointError(path, f"no classifier named {name!r}; found {sorted(groups)}")


def _name_option(name: str, key: str, default: str) -> str:
    m = re.search(rf"(?:^|:){key}=([^:]+)", name)
    return m.group(1) if m else default


def _findings(path: Path, n: int, findings: Sequence[str] | None) -> list[str]:
    if findings is not None:
        if len(findings) != n:
            raise CheckpointError(path, f"{len(findings)} finding names given for a head with {n} outputs")
        return list(findings)
    return list(CXRLT24) if n == len(CXRLT24) else [f"class_{i}" for i in range(n)]


def _glori(path: Path, name: str, p: dict[str, Tensor], findings: Sequence[str] | None, num_heads: int) -> Head:
    missing = [k for k in (*_DECODER_KEYS, "duplicate_pooling") if k not in p]
    if missing:
        raise CheckpointError(path, f"classifier {name!r} lacks ML-Decoder parameters {missing}")
    dec_dim, in_dim = p["embed_standart.weight"].shape
    pool = p["duplicate_pooling"]
    if pool.ndim != 3 or pool.shape[2] != 1:
        raise CheckpointError(path, f"duplicate_pooling of shape {tuple(pool.shape)}: grouped ML-Decoder "
                                    "(several classes per query) is not supported")
    n_cls, fc_in = pool.shape[0], pool.shape[1]
    if p["query_embed.weight"].shape[0] != n_cls:
        raise CheckpointError(path, f"{p['query_embed.weight'].shape[0]} queries for {n_cls} classes")
    if fc_in == dec_dim:
        cat_cls = False
    elif fc_in == dec_dim + in_dim:
        cat_cls = True
    else:
        raise CheckpointError(path, f"duplicate_pooling width {fc_in} is neither {dec_dim} nor {dec_dim + in_dim}")
    n_blocks = int(_name_option(name, "blocks", "4"))
    if in_dim % n_blocks:
        raise CheckpointError(path, f"embedding input {in_dim} is not {n_blocks} blocks of equal width")
    head = GloriHead(_findings(path, n_cls, findings), n_blocks, "multilabel", embed_dim=in_dim // n_blocks,
                     decoder_dim=dec_dim, num_heads=num_heads, ffn_dim=p["layers.0.linear1.weight"].shape[0],
                     cat_cls=cat_cls)
    sd = {ours: p[theirs] for theirs, ours in _DECODER_KEYS.items()}
    sd["class_weight"] = pool[:, :, 0]
    sd["thresholds"] = head.thresholds
    _load(path, head, sd)
    return head


def _linear(path: Path, name: str, p: dict[str, Tensor], findings: Sequence[str] | None) -> Head:
    if "weight" not in p or "bias" not in p:
        raise CheckpointError(path, f"linear classifier {name!r} lacks weight/bias")
    n_cls, in_dim = p["weight"].shape
    n_blocks = int(_name_option(name, "blocks", "4"))
    avgpool = _name_option(name, "avgpool", "False") == "True"
    parts = n_blocks + int(avgpool)
    if in_dim % parts:
        raise CheckpointError(path, f"linear input {in_dim} does not split into {parts} equal parts")
    head = LinearHead(_findings(path, n_cls, findings), n_blocks, "multilabel", embed_dim=in_dim // parts,
                      avgpool=avgpool)
    _load(path, head, {"linear.weight": p["weight"], "linear.bias": p["bias"], "thresholds": head.thresholds})
    return head


def _load(path: Path, head: Head, sd: dict[str, Tensor]) -> None:
    try:
        head.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(path, f"released weights do not fit the head: {e}") from e


def load_released_head(path: str | PathLike[str], name: str | None = None, findings: Sequence[str] | None = None,
                       num_heads: int = 8) -> Head:
    """Original CheXFound head file -> our Head (eval mode). `num_heads` is not stored in the file (8 released)."""
    p = Path(path)
    sd = _read_state_dict(p)
    groups = _group(sd)
    if not groups:
        from chexfound.models.loaders.describe import describe_state_dict

        raise CheckpointError(p, f"no `classifiers_dict.<name>.decoder.` or `.linear.` keys: not a CheXFound head "
                                 f"(this is {describe_state_dict(sd)})")
    chosen = _pick(p, groups, name)
    kind, params = groups[chosen]
    head = _glori(p, chosen, params, findings, num_heads) if kind == "decoder" else _linear(p, chosen, params, findings)
    return head.eval()
