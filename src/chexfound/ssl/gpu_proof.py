"""The GPU proof in one command: pretrain the `proof_vits16_224` preset, gather what a remote machine can hand
back into one folder, and print a verdict.

  make gpu-proof OUT=DIR                                    # from a source tree, no install
  PYTHONPATH=src python -m chexfound pretrain --config proof_vits16_224 --proof-out DIR

`DIR` receives at most 8 files of at most 16 MiB: the teacher as bf16 safetensors shards
(`teacher_backbone.NN-of-NN.safetensors`, read back with `chexfound.ssl.checkpoint.load_backbone_shards`),
`proof.tar.gz` (metrics.jsonl, config.yaml, probe_comparison.json, report.png, pretrain.log, verdict.txt) and
`verdict.json`. The verdict: on each final task (Kermany test, NIH-14 test patients), does the teacher beat its
own iteration-0 weights, every random init and 32x32 pixels, i.e. is the lower end of the paired bootstrap 95%
CI of (teacher - baseline) above zero?

The path imports only torch, numpy, scikit-learn, scipy, pandas, safetensors, pyyaml, Pillow and tqdm
(matplotlib only for report.png, which is skipped with a note when it is missing); `check_environment` names
whatever is missing before any time is spent.
"""

from __future__ import annotations

import importlib.util
import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

from chexfound.errors import ChexfoundError
from chexfound.runio import atomic_output, atomic_write_json

MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
ARCHIVE = "proof.tar.gz"
ARCHIVED = ("metrics.jsonl", "config.yaml", "probe_comparison.json", "report.png", "pretrain.log")
# import name -> what to install
REQUIRED = {"torch": "torch>=2.11", "numpy": "numpy", "sklearn": "scikit-learn", "scipy": "scipy",
            "pandas": "pandas", "safetensors": "safetensors", "yaml": "pyyaml", "PIL": "Pillow", "tqdm": "tqdm"}
OPTIONAL = {"matplotlib": "matplotlib (for report.png)"}


def check_environment() -> list[str]:
    """Raise naming every missing package the proof needs; return notes on optional ones."""
    missing = [pip for mod, pip in REQUIRED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ChexfoundError(f"the GPU proof needs these Python packages: {', '.join(missing)} "
                             f"(pip install {' '.join(m.split('>')[0] for m in missing)})")
    import torch

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if (major, minor) < (2, 11):
        raise ChexfoundError(f"the GPU proof needs torch >= 2.11 (found {torch.__version__})")
    return [f"{pip} is not installed: no report.png" for mod, pip in OPTIONAL.items()
            if importlib.util.find_spec(mod) is None]


# -- the verdict ------------------------------------------------------------------------------------------
TASK_NAMES = {"kermany": "Kermany test", "nih14": "NIH-14 test patients"}


def _short(baseline: str) -> str:
    """The verdict's name of a baseline: init, random_seedK, pixels."""
    return {"init (iteration 0)": "init", "pixels_32x32": "pixels"}.get(
        baseline, baseline.replace("random_init_seed", "random_seed"))


def verdict(comparison: dict[str, Any], random_seeds: int) -> dict[str, Any]:
    """Per task and baseline: 'beats' (CI of teacher - baseline above 0), 'loses' (below 0) or 'ties';
    `passed` when the teacher beats every baseline on every task and all `random_seeds` random inits were
    compared. `comparison`: probe_comparison.json's content (any version `read_comparisons` reads)."""
    from chexfound.stats import read_comparisons

    out: dict[str, Any] = {"tasks": {}, "notes": []}
    passed = bool(comparison)
    comps = read_comparisons(comparison)
    for task, c in comps.items():
        rows = {}
        for p in c.paired.values():
            if p.model != "teacher" or p.error is not None:
                continue
            d = p.auroc
            lo, hi = d.ci
            rows[_short(p.reference)] = {
                "diff": d.diff, "ci95": [lo, hi],
                "result": "beats" if lo > 0 else ("loses" if hi < 0 else "ties")}
        n_random = sum(k.startswith("random") for k in rows)
        if n_random < random_seeds:
            out["notes"].append(f"{task}: {n_random} of {random_seeds} random inits compared (turned down by the budget)")
            passed = False
        for need in ("init", "pixels"):
            if need not in rows:
                out["notes"].append(f"{task}: no {need} baseline")
                passed = False
        passed &= all(v["result"] == "beats" for v in rows.values())
        out["tasks"][task] = {"auroc": c.models["teacher"].auroc, "vs": rows}
    for t in TASK_NAMES:
        if t not in comps:
            out["notes"].append(f"no {TASK_NAMES[t]} comparison")
            passed = False
    out["passed"] = passed
    return out


def verdict_text(v: dict[str, Any]) -> str:
    lines = ["GPU proof verdict: does the pretrained teacher beat its own init, every random init and 32x32 "
             "pixels (paired bootstrap 95% CI of teacher - baseline above 0)?"]
    for task, r in v["tasks"].items():
        lines.append(f"  {TASK_NAMES.get(task, task)} (teacher AUROC {r['auroc']:.3f}):")
        for name, x in r["vs"].items():
            lines.append(f"    vs {name:<14} {x['diff']:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}]  {x['result']}")
    lines += [f"  note: {n}" for n in v["notes"]]
    lines.append(f"  => {'YES: it beats them all on both tasks' if v['passed'] else 'NO: not on every task and baseline'}")
    return "\n".join(lines)


# -- gathering ---------------------------------------------------------------------------------------------
def gather(run_dir: str | Path, dest: str | Path, v: dict[str, Any]) -> list[Path]:
    """Copy the bf16 shards, pack the run's small files into one archive and write verdict.json into `dest`;
    every file is checked against the hand-back limits."""
    run, out = Path(run_dir), Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    shards = sorted((run / "teacher_bf16").glob("teacher_backbone.*-of-*.safetensors"))
    if not shards:
        raise ChexfoundError(f"{run / 'teacher_bf16'}: no teacher shards (checkpoint.export_bf16_shard_mib unset?)")
    if len(shards) + 2 > MAX_FILES:
        raise ChexfoundError(f"{len(shards)} teacher shards + 2 files exceed the {MAX_FILES}-file limit; "
                             "raise checkpoint.export_bf16_shard_mib (at most 16)")
    files = []
    for s in shards:
        with atomic_output(out / s.name) as tmp:
            shutil.copyfile(s, tmp)
        files.append(out / s.name)
    text = verdict_text(v) + "\n"
    with atomic_output(out / ARCHIVE) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for name in ARCHIVED:
            if (run / name).is_file():
                tar.add(run / name, arcname=name)
        info = tarfile.TarInfo("verdict.txt")
        info.size = len(text.encode())
        tar.addfile(info, io.BytesIO(text.encode()))
    files.append(out / ARCHIVE)
    files.append(atomic_write_json(out / "verdict.json", v))  # strict JSON: a NaN bound is written as null
    for f in files:
        if f.stat().st_size > MAX_FILE_BYTES:
            raise ChexfoundError(f"{f}: {f.stat().st_size / 2**20:.1f} MiB exceeds the 16 MiB hand-back limit")
    return files
