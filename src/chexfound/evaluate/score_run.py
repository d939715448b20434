"""`chexfound evaluate --predictions`: score any model's predictions file against a manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chexfound.data.manifest import Manifest, read_manifest
from chexfound.errors import ChexfoundError, ManifestError
from chexfound.evaluate.protocols.common import EvalConfig, score_predictions
from chexfound.evaluate.report import Figure, Report, write_report
from chexfound.models.format import sha256_file

from chexfound.evaluate.run_common import classification_figures, provenance

log = logging.getLogger(__name__)


# --- score a predictions file -----------------------------------------------------------------------------

@dataclass
class ScoreOptions:
    findings: Sequence[str] | None = None
    id_column: str | None = None
    split: str | None = None
    thresholds: str | None = None
    train_labels: str | None = None
    allow_missing: bool = False
    uncertain: str = "nan"
    kind: str = "multilabel"  # multilabel | multiclass | regression | survival
    targets: Sequence[str] | None = None  # regression: target columns; survival: (time, event)
    risk_column: str = "risk"  # survival: the prediction column with the risk score
    cfg: EvalConfig = field(default_factory=EvalConfig)


def score_file(predictions: str | PathLike[str], labels: str | PathLike[str], out: str | PathLike[str],
               opts: ScoreOptions = ScoreOptions()) -> dict[str, Any]:
    from chexfound.evaluate.score import match_predictions, read_predictions, read_thresholds, recorded_thresholds

    pred_path = Path(predictions)
    preds = read_predictions(pred_path)
    man = read_manifest(labels, labels=opts.findings)
    train_y = None
    if opts.split:
        if "split" not in man.df.columns:
            raise ManifestError(man.source, "--split given but the manifest has no 'split' column")
        if opts.train_labels is None and (man.df["split"] == "train").any():
            train_y = man.split("train").labels(opts.uncertain)
        man = man.split(opts.split)
        if not len(man):
            raise ManifestError(man.source, f"no rows with split == {opts.split!r}")
    if opts.uncertain != "nan":  # resolve -1 before matching (Manifest.labels does it per call)
        y_all = man.labels(opts.uncertain)
        man.df[man.label_columns] = y_all
    if opts.kind != "multilabel":
        return _score_other(preds, pred_path, man, labels, out, opts, train_y)
    mt = match_predictions(preds, man, pred_path, opts.findings, opts.id_column, opts.allow_missing)
    if opts.train_labels:
        tm = read_manifest(opts.train_labels)
        from chexfound.data.findings import finding_map as map_findings

        mp = map_findings(mt.findings, tm.label_columns)
        miss = [f for f in mt.findings if f not in mp]
        if miss:
            raise ManifestError(tm.source, f"training manifest lacks label(s) {miss} (needed for prevalence groups)")
        tm.label_columns = [mp[f] for f in mt.findings]
        train_y = tm.labels(opts.uncertain)
    thr, thr_source = _thresholds(opts.thresholds, pred_path, mt.findings, read_thresholds, recorded_thresholds)
    log.info("calls scored at: %s", thr_source)
    res = score_predictions(mt.y, mt.p, mt.patients, mt.findings, thr, train_y, opts.cfg)
    res["thresholds_used"] = {"source": thr_source,
                              "values": {f: (float(t) if np.isfinite(t) else None) for f, t in
                                         zip(mt.findings, np.full(len(mt.findings), 0.5) if thr is None else thr)}}
    res["min_positives"] = {"rule": opts.cfg.rule.describe(), "left_out": res.get("excluded", [])}
    prov = provenance({
        "predictions": {"path": str(pred_path.resolve()), "sha256": sha256_file(pred_path)},
        "labels": {"path": str(Path(labels).resolve()), "sha256": sha256_file(labels)},
        "manifest_sha256": sha256_file(labels), "matching": mt.info,
        "thresholds": thr_source,
    })
    metrics = {"protocol": "score", **res, "provenance": prov,
               "config": {"split": opts.split, "uncertain": opts.uncertain, "findings": mt.findings,
                          **opts.cfg.to_dict()}}
    rep = Report(f"Evaluation of {pred_path.name}", metrics,
                 classification_figures(mt.y, {pred_path.stem: mt.p}, mt.findings, res),
                 notes=[f"{mt.info['n_matched']} images matched by {mt.info['id_column']} ({mt.info['matched_by']});"
                        f" {mt.info['n_missing']} without prediction; {mt.info['n_extra_predictions']} extra "
                        f"prediction rows ignored",
                        f"Calls (sensitivity, specificity, F1) at: {thr_source}.",
                        f"Scored: {opts.cfg.rule.describe()}. Listed but left out of macro figures, without CIs: "
                        + (", ".join(f"{f} ({res['per_finding'][f]['n_pos']} positives)" for f in res["excluded"])
                           or "none") + "."])
    write_report(out, rep)
    return metrics


def _thresholds(option: str | None, pred_path: Path, findings: list[str], read: Any,
                recorded: Any) -> tuple[np.ndarray | None, str]:
    """Which thresholds the calls are scored at, and a sentence saying so: `--thresholds FILE`, `--thresholds 0.5`
    (or `default`), else those `chexfound predict` recorded beside the file (NaN: predict made no call), else 0.5."""
    if option and option.strip().lower() in ("0.5", "default"):
        return None, "0.5 for every finding (--thresholds default)"
    if option:
        return read(option, findings), f"the thresholds in {option}"
    rec = recorded(pred_path, findings)
    if rec is not None:
        thr, run = rec
        nocall = [f for f, t in zip(findings, thr) if not np.isfinite(t)]
        return thr, (f"the thresholds chexfound predict recorded in {run.name}"
                     + (f" (no call, so no call metrics, for {', '.join(nocall)})" if nocall else ""))
    return None, "0.5 for every finding (no thresholds given or recorded beside the predictions)"


def _score_other(preds: Any, pred_path: Path, man: Manifest, labels: str | PathLike[str], out: str | PathLike[str],
                 opts: ScoreOptions, train_y: np.ndarray | None) -> dict[str, Any]:
    """Multiclass (one-hot label columns, one probability column per class), regression (`targets`, predicted
    under the same names) or survival (`targets` = time, event; prediction column `risk_column`)."""
    import pandas as pd

    from chexfound.evaluate.score import match_predictions
    from chexfound.evaluate.score_kinds import class_index, score_multiclass, score_regression, score_survival

    figs: list[Figure] = []
    if opts.kind == "multiclass":
        mt = match_predictions(preds, man, pred_path, opts.findings, opts.id_column, opts.allow_missing)
        # (no prevalence groups here: they describe long-tailed multi-label sets)
        res = score_multiclass(class_index(mt.y), mt.p, mt.findings, mt.patients, opts.cfg)
        figs = classification_figures(mt.y, {pred_path.stem: mt.p}, mt.findings, res)
        tables = [("Multiclass", pd.DataFrame([{k: res["multiclass"].get(k) for k in
                                                ("n", "accuracy", "accuracy_ci", "balanced_accuracy",
                                                 "balanced_accuracy_ci")} | {"macro AUROC": res["macro"]["auroc"]}]))]
    elif opts.kind == "regression":
        if not opts.targets:
            raise ChexfoundError("--kind regression needs --targets COLUMN[,COLUMN...]")
        mt = match_predictions(preds, man, pred_path, list(opts.targets), opts.id_column, opts.allow_missing)
        y = mt.frame[mt.findings].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        res = score_regression(y, mt.p, mt.findings, mt.patients, opts.cfg)
        tables = [("Regression", pd.DataFrame([{"target": t, **v} for t, v in res["regression"].items()]))]
    elif opts.kind == "survival":
        if not opts.targets or len(opts.targets) != 2:
            raise ChexfoundError("--kind survival needs --targets TIME_COLUMN,EVENT_COLUMN")
        missing = [c for c in opts.targets if c not in man.df.columns]
        if missing:
            raise ManifestError(man.source, f"survival column(s) {missing} not in manifest")
        mt = match_predictions(preds, man, pred_path, None, opts.id_column, opts.allow_missing,
                               columns=[opts.risk_column])
        tv = mt.frame[list(opts.targets)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        res = score_survival(tv[:, 0], tv[:, 1], mt.p[:, 0], mt.patients, opts.cfg)
        tables = [("Survival", pd.DataFrame([res["survival"]]))]
    else:
        raise ChexfoundError(f"unknown --kind {opts.kind!r} (multilabel, multiclass, regression, survival)")
    prov = provenance({
        "predictions": {"path": str(pred_path.resolve()), "sha256": sha256_file(pred_path)},
        "labels": {"path": str(Path(labels).resolve()), "sha256": sha256_file(labels)},
        "manifest_sha256": sha256_file(labels), "matching": mt.info})
    metrics = {"protocol": "score", "kind": opts.kind, **res, "provenance": prov,
               "config": {"split": opts.split, "kind": opts.kind, "targets": opts.targets, **opts.cfg.to_dict()}}
    write_report(out, Report(f"Evaluation of {pred_path.name} ({opts.kind})", metrics, figs, tables))
    return metrics
