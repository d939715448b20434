"""Model-card result tables from what a run wrote: pretraining's `probe_comparison.json`, an adapt run's
`<head>.metrics.json`, evaluate's `metrics.json`. Every number on a card comes from one of these files (or the
same dict before it was written), and the card names the file."""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any, Mapping

from chexfound.errors import ConfigError
from chexfound.models.card import ResultTable

__all__ = ["adapt_tables", "evaluate_tables", "probe_comparison_tables", "results_from_file"]

_BASELINES = {"teacher": "this model (the run's teacher)", "init (iteration 0)": "its initialisation (iteration 0)",
              "pixels_32x32": "32x32 raw pixels"}


def _label(key: str) -> str:
    if key.startswith("random_init_seed"):
        return f"random initialisation, seed {key.rsplit('seed', 1)[1]}"
    return _BASELINES.get(key, key)


def probe_comparison_tables(report: Mapping[str, Any], source: str) -> list[ResultTable]:
    """One table per probe task: AUROC with 95% CI of this model and each baseline, then the paired
    differences (this model minus each baseline, on the same test images). Read through
    `chexfound.stats.read_comparisons`, so older probe_comparison.json files give the same table."""
    from chexfound.stats import read_comparisons

    out = []
    for task, c in read_comparisons(report).items():
        rows: list[tuple[Any, ...]] = [(_label(k), "AUROC", m.auroc, tuple(m.auroc_ci)) for k, m in c.models.items()]
        rows += [(f"{_label(p.model)} minus {_label(p.reference)}", "paired AUROC difference", p.auroc.diff,
                  tuple(p.auroc.ci)) for p in c.paired.values() if p.error is None and "auroc" in p.macro]
        boot, extra = c.bootstrap or {}, c.extra or {}
        notes = [f"{extra.get('probe', 'linear probe')} on frozen features: {extra.get('n_train')} training and "
                 f"{extra.get('n_test')} held-out test images"
                 + (f", mean over {len(c.findings)} findings" if len(c.findings) > 1 else "") + ".",
                 f"95% CIs from a bootstrap over {boot.get('unit', 'images')}"
                 + (f" ({boot['n_boot']} resamples)" if boot.get("n_boot") else "") + "; a paired difference whose "
                 "CI excludes 0 is a difference the test set shows."]
        out.append(ResultTable(f"Linear probe: {task}", source, ("features", "metric", "value", "95% CI"),
                               tuple(rows), tuple(notes)))
    return out


def adapt_tables(summary: Mapping[str, Any], source: str) -> list[ResultTable]:
    """The head's validation numbers: the selection metric, and AUROC / AP per output."""
    best, metric = summary.get("best") or {}, summary.get("metric")
    value = best.get(metric) if metric else None
    rows: list[tuple[Any, ...]] = []
    for r in summary.get("per_finding") or []:
        rows.append((r["finding"], r.get("n_pos"), r.get("n_neg"), r.get("auroc"), r.get("ap")))
    notes = [f"Validation split ({summary.get('val_images')} images; {summary.get('train_images')} for training): the "
             "split that chose the learning rate and the thresholds, so these numbers are optimistic and have no "
             "CI. Test it on held-out data with `chexfound evaluate`."]
    if isinstance(value, (int, float)):
        notes.insert(0, f"Selected by validation {metric}: {value:.4f}.")
    if not rows:
        return [ResultTable("Validation (model selection)", source, ("metric", "value"), ((metric, value),),
                            tuple(notes))] if isinstance(value, (int, float)) else []
    return [ResultTable("Validation (model selection)", source, ("output", "positives", "negatives", "AUROC", "AP"),
                        tuple(rows), tuple(notes))]


def evaluate_tables(metrics: Mapping[str, Any], source: str) -> list[ResultTable]:
    """`chexfound evaluate`'s summary: macro (and micro) AUROC / AP with their 95% CIs."""
    rows: list[tuple[Any, ...]] = []
    for subset in ("macro", "micro"):
        m = metrics.get(subset)
        if isinstance(m, dict):
            rows.append((subset, m.get("auroc"), tuple(m.get("auroc_ci") or (None, None)), m.get("ap"),
                         tuple(m.get("ap_ci") or (None, None))))
    if not rows:
        return []
    b = metrics.get("bootstrap") or {}
    notes = []
    task = (metrics.get("provenance") or {}).get("task")
    if isinstance(task, dict):
        task = task.get("task")
    if task:
        notes.append(f"Task: {task}.")
    if b:
        notes.append(f"95% CIs: {b.get('level')}-level percentile bootstrap, {b.get('n_boot')} resamples.")
    return [ResultTable("Evaluation", source, ("average", "AUROC", "AUROC 95% CI", "AP", "AP 95% CI"), tuple(rows),
                        tuple(notes))]


def results_from_file(path: str | PathLike[str]) -> tuple[list[ResultTable], str | None]:
    """Tables from any of the three files, recognised by their content -> (tables, the backbone weights
    SHA-256 the numbers were measured on where the file records it)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(p, f"cannot read results ({e})") from e
    if not isinstance(d, dict):
        raise ConfigError(p, "results must be a JSON object")
    if "macro" in d and isinstance(d.get("macro"), dict):
        return evaluate_tables(d, p.name), (d.get("provenance") or {}).get("backbone_sha256")
    if "best" in d and "metric" in d:
        return adapt_tables(d, p.name), d.get("backbone_sha256")
    if d and all(isinstance(v, dict) and "auroc" in v and "paired" in v for v in d.values()):
        return probe_comparison_tables(d, p.name), None
    raise ConfigError(p, "not a results file chexfound writes (evaluate's metrics.json, adapt's <head>.metrics.json "
                         "or pretraining's probe_comparison.json)")
