"""`chexfound evaluate`: score a predictions file against labels, or run an evaluation protocol on a task.

  chexfound evaluate --predictions preds.csv --labels manifest.csv --out DIR
  chexfound evaluate --task nih14 --root DATA/nih14 --backbone W.safetensors [--head linear] \\
                     [--protocol compare|label-efficiency|localisation|ood] --out DIR
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from chexfound.cli.options import head_type_choices
from chexfound.data.uncertain import UNCERTAIN_POLICIES
from chexfound.errors import ChexfoundError

log = logging.getLogger(__name__)


def _floats(s: str) -> list[float]:
    vals = [float(v) for v in s.split(",") if v.strip()]
    # "1,2,5,100" (any value above 1) means percent; "0.01,0.5,1" means fractions.
    return [v / 100 for v in vals] if any(v > 1 for v in vals) else vals


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate", help="metrics with patient-level CIs, protocols and reports",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("score a predictions file")
    src.add_argument("--predictions", help="CSV: path or image_id column, then one probability column per finding")
    src.add_argument("--labels", help="labelled manifest CSV (path, patient_id, one column per finding)")
    src.add_argument("--id-column", choices=["path", "image_id"], help="match rows by this column (default: "
                     "image_id when both files have it, else path)")
    src.add_argument("--split", help="score only manifest rows of this split (e.g. test)")
    src.add_argument("--findings", help="comma-separated findings to score (default: all matching columns)")
    src.add_argument("--thresholds", help="JSON {finding: threshold}, a head .safetensors, or 'default' (0.5); by "
                     "default the thresholds `chexfound predict` recorded beside the file (preds.run.json), else 0.5")
    src.add_argument("--train-labels", help="training manifest, for prevalence groups (head/medium/tail)")
    src.add_argument("--allow-missing", action="store_true", help="score manifest rows that have predictions only")
    src.add_argument("--kind", choices=["multilabel", "multiclass", "regression", "survival"], default="multilabel",
                     help="multiclass: one-hot label columns; regression: --targets; survival: --targets TIME,EVENT "
                          "and a risk column")
    src.add_argument("--targets", help="comma-separated manifest columns (regression targets / survival time,event)")
    src.add_argument("--risk-column", default="risk", help="survival: prediction column with the risk score")
    src.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="nan",
                     help="how to treat -1 (uncertain) labels (default: ignore)")
    tk = p.add_argument_group("run a protocol on a dataset task")
    tk.add_argument("--task", help="nih14 | chexpert | cxrlt24 | mimic | vindr | kermany")
    tk.add_argument("--root", help="the dataset folder")
    tk.add_argument("--image-root", help="folder the task's image paths are relative to, when not --root "
                    "(nih14, cxrlt24, mimic)")
    tk.add_argument("--backbone", action="append", default=[],
                    help="backbone file, hf:// id or registry name (random weights); repeat to compare")
    tk.add_argument("--head", action="append", default=[], choices=head_type_choices("logistic"), metavar="HEAD",
                    help="head type (repeat to compare; default linear). linear/mlp/glori train the adapt stage's "
                         "heads (learning-rate grid, selection and thresholds on val) on the feature cache; "
                         "logistic is a deterministic L2 logistic-regression probe on pooled features (fast on CPU)")
    tk.add_argument("--epochs", type=int, default=20, help="adapt heads: training epochs (default 20)")
    tk.add_argument("--lrs", type=lambda s: [float(v) for v in s.split(",") if v.strip()],
                    help="adapt heads: comma-separated learning-rate grid (default: the original's 13 values)")
    tk.add_argument("--decoder-dim", type=int, help="GLoRI decoder width (default 768)")
    tk.add_argument("--protocol", default="compare", choices=["compare", "label-efficiency", "localisation", "ood"])
    tk.add_argument("--n-blocks", type=int, default=4, help="CLS tokens of the last n blocks (default 4)")
    tk.add_argument("--no-avgpool", action="store_true", help="linear probe without the mean patch token")
    tk.add_argument("--image-size", type=int, help="override the backbone's input size")
    tk.add_argument("--fractions", type=_floats, default=[0.01, 0.02, 0.05, 0.10, 0.25, 0.50, 1.0],
                    help="label-efficiency fractions of training patients (default 1,2,5,10,25,50,100 %%)")
    tk.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="label-efficiency seeds (default 0,1,2)")
    tk.add_argument("--ood-task", help="test task for --protocol ood")
    tk.add_argument("--ood-root", help="test dataset folder for --protocol ood")
    tk.add_argument("--loc-split", default="test", choices=["test", "val", "train", "all"],
                    help="images whose boxes are scored (default test)")
    tk.add_argument("--loc-tolerance", type=float, default=0.0, help="pointing-game tolerance in input pixels")
    tk.add_argument("--limit", type=int, help="quick run: at most ~N images per split (whole patients)")
    st = p.add_argument_group("statistics")
    st.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0 = no CIs; default 1000)")
    st.add_argument("--ci", type=float, default=0.95)
    st.add_argument("--bootstrap-level", choices=["patient", "image"], default="patient")
    st.add_argument("--min-pos", type=int, default=None,
                    help="findings need >= this many test positives to enter macro figures and get CIs (default: "
                         f"{MIN_SCORED_POSITIVES} for --predictions, 1 for --task); fewer are listed, not scored")
    st.add_argument("--min-neg", type=int, default=1, help="... and negatives to enter macro/micro means")
    st.add_argument("--groups-by", choices=["frequency", "count"], default="frequency")
    st.add_argument("--head-threshold", type=float, help="head group: training frequency/count above this "
                    "(default 0.10 for frequency, 1000 for count)")
    st.add_argument("--tail-threshold", type=float, help="tail group: at or below this (default 0.01 / 100)")
    co = p.add_argument_group("common")
    co.add_argument("--out", required=True, help="report folder (metrics.json, report.md/html, figures/)")
    co.add_argument("--device", default="auto")
    co.add_argument("--batch-size", type=int, default=32)
    co.add_argument("--workers", type=int, default=0)
    co.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


# Scoring a predictions file: a finding with fewer test positives than this is listed but left out of macro
# figures and gets no CI (an AUROC from one or two positives has a meaningless interval).
MIN_SCORED_POSITIVES = 5


def _cfg(args: argparse.Namespace) -> Any:
    from chexfound.stats import BootstrapConfig, EligibilityRule
    from chexfound.evaluate.groups import GroupConfig
    from chexfound.evaluate.protocols.common import EvalConfig

    head_t = args.head_threshold if args.head_threshold is not None else (0.10 if args.groups_by == "frequency" else 1000)
    tail_t = args.tail_threshold if args.tail_threshold is not None else (0.01 if args.groups_by == "frequency" else 100)
    try:
        groups = GroupConfig(by=args.groups_by, head=head_t, tail=tail_t)
    except ValueError as e:
        raise ChexfoundError(str(e)) from e
    return EvalConfig(BootstrapConfig(n_boot=args.bootstrap, ci=args.ci, seed=args.seed, level=args.bootstrap_level),
                      EligibilityRule(_min_pos(args), args.min_neg), groups)


def _min_pos(args: argparse.Namespace) -> int:
    if args.min_pos is not None:
        return int(args.min_pos)
    return MIN_SCORED_POSITIVES if args.predictions else 1


def run(args: argparse.Namespace) -> int:
    from chexfound.evaluate.pipeline import TaskOptions, evaluate_task
    from chexfound.evaluate.score_run import ScoreOptions, score_file

    cfg = _cfg(args)
    if args.predictions or args.labels:
        if not (args.predictions and args.labels):
            raise ChexfoundError("scoring needs both --predictions and --labels")
        if args.task:
            raise ChexfoundError("use either --predictions/--labels or --task, not both")
        findings = [f.strip() for f in args.findings.split(",")] if args.findings else None
        m = score_file(args.predictions, args.labels, args.out, ScoreOptions(
            findings=findings, id_column=args.id_column, split=args.split, thresholds=args.thresholds,
            train_labels=args.train_labels, allow_missing=args.allow_missing, uncertain=args.uncertain,
            kind=args.kind, targets=[t.strip() for t in args.targets.split(",")] if args.targets else None,
            risk_column=args.risk_column, cfg=cfg))
    elif args.task:
        if not args.root:
            raise ChexfoundError("--task needs --root (the dataset folder)")
        if not args.backbone:
            raise ChexfoundError("--task needs at least one --backbone (file or registry name)")
        m = evaluate_task(args.task, args.root, args.backbone, args.out, TaskOptions(
            protocol=args.protocol, heads=args.head or ["linear"], n_blocks=args.n_blocks,
            avgpool=not args.no_avgpool, image_size=args.image_size, epochs=args.epochs, lrs=args.lrs,
            decoder_dim=args.decoder_dim, fractions=args.fractions, seeds=args.seeds,
            ood_task=args.ood_task, ood_root=args.ood_root, image_root=args.image_root, loc_split=args.loc_split,
            loc_tolerance=args.loc_tolerance, limit=args.limit, batch_size=args.batch_size, workers=args.workers,
            device=args.device, dtype=args.dtype, seed=args.seed, progress=not args.quiet, cfg=cfg))
    else:
        raise ChexfoundError("give --predictions and --labels, or --task, --root and --backbone")
    if not args.quiet and m.get("kind") in ("regression", "survival"):
        print(f"{m['kind']}: {m.get(m['kind'])} -> {args.out}/report.html")
    elif not args.quiet:
        mac = m["macro"]
        ci = mac.get("auroc_ci") or [float("nan")] * 2
        print(f"macro AUROC {mac['auroc']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]  macro AP {mac['ap']:.4f}  "
              f"({mac.get('n_findings')} findings)  -> {args.out}/report.html")
        if "brier" in mac:
            print(f"macro Brier {mac['brier']:.4f}  macro ECE {mac['ece']:.4f} "
                  f"({m.get('calibration', {}).get('ece_bins')} equal-mass bins)")
        if m.get("thresholds_used"):
            print(f"calls at {m['thresholds_used']['source']}")
        if m.get("excluded"):
            print(f"not scored (< {_min_pos(args)} test positives): {', '.join(m['excluded'])}")
    return 0
