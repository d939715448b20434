"""Report folder: metrics.json (every number + exact config and provenance), report.md, report.html, figures/.

Every file is written atomically (temp file + rename); metrics.json is written last, so a folder with a
metrics.json always holds a complete report. NaN/inf become JSON null. The HTML references the PNGs by
relative path, so the folder can be moved or zipped as a whole.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from chexfound.runio import atomic_write_bytes, atomic_write_json


def write_json(path: str | PathLike[str], obj: Any) -> None:
    atomic_write_json(path, obj, indent=2)


@dataclass
class Figure:
    name: str       # file name under figures/ (…png)
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Report:
    title: str
    metrics: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # extra files (e.g. predictions.csv)


def ci_methods_text(calibration: Mapping[str, Any] | None) -> str:
    """Which bootstrap interval each calibration CI is, in words ("" when the metrics do not say: reports
    written before the calibration summary recorded it)."""
    methods = (calibration or {}).get("ci_method") or {}
    names = {"brier": "Brier", "ece": "ECE", "cal_intercept": "intercept", "cal_slope": "slope"}
    by: dict[str, list[str]] = {}
    for k, m in methods.items():
        by.setdefault(str(m), []).append(names.get(k, k))
    return "; ".join(f"{', '.join(ks)}: {m}" for m, ks in by.items())


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "–" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"[{_fmt(v[0], digits)}, {_fmt(v[1], digits)}]"
    return str(v)


def per_finding_table(m: Mapping[str, Any]) -> pd.DataFrame:
    rows = []
    for name, d in m.get("per_finding", {}).items():
        rows.append({
            "finding": name, "group": d.get("group", ""), "n_pos": d.get("n_pos"), "n_neg": d.get("n_neg"),
            "AUROC": d.get("auroc"), "AUROC 95% CI": d.get("auroc_ci"), "AP": d.get("ap"),
            "AP 95% CI": d.get("ap_ci"), "threshold": d.get("threshold"), "sens": d.get("sensitivity"),
            "spec": d.get("specificity"), "F1": d.get("f1"),
            **({"Brier": d.get("brier"), "Brier 95% CI": d.get("brier_ci"), "ECE": d.get("ece"),
                "ECE 95% CI": d.get("ece_ci"), "cal. slope": d.get("cal_slope"),
                "cal. intercept": d.get("cal_intercept")} if "brier" in d else {}),
        })
    return pd.DataFrame(rows)


def calibration_table(m: Mapping[str, Any]) -> pd.DataFrame | None:
    """Macro calibration with CIs (chexfound.stats.calibration); None when the metrics hold none."""
    mac = m.get("macro", {})
    if "brier" not in mac:
        return None
    return pd.DataFrame([{"subset": "macro", "Brier": mac.get("brier"), "Brier 95% CI": mac.get("brier_ci"),
                          "ECE": mac.get("ece"), "ECE 95% CI": mac.get("ece_ci"),
                          "cal. intercept": mac.get("cal_intercept"),
                          "intercept 95% CI": mac.get("cal_intercept_ci"), "cal. slope": mac.get("cal_slope"),
                          "slope 95% CI": mac.get("cal_slope_ci")}])


def summary_table(m: Mapping[str, Any]) -> pd.DataFrame:
    rows = [{"subset": "macro", "findings": m["macro"].get("n_findings"), "AUROC": m["macro"].get("auroc"),
             "AUROC 95% CI": m["macro"].get("auroc_ci"), "AP": m["macro"].get("ap"),
             "AP 95% CI": m["macro"].get("ap_ci")}]
    if "micro" in m:
        rows.append({"subset": "micro", "findings": m["macro"].get("n_findings"), "AUROC": m["micro"].get("auroc"),
                     "AUROC 95% CI": m["micro"].get("auroc_ci"), "AP": m["micro"].get("ap"),
                     "AP 95% CI": m["micro"].get("ap_ci")})
    for g, d in m.get("groups", {}).items():
        rows.append({"subset": g, "findings": d.get("n_eligible"), "AUROC": d.get("auroc"),
                     "AUROC 95% CI": d.get("auroc_ci"), "AP": d.get("ap"), "AP 95% CI": d.get("ap_ci")})
    return pd.DataFrame(rows)


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for i in range(len(df)):  # per column, so integer columns stay integers
        lines.append("| " + " | ".join(_fmt(df[c].iloc[i]) for c in cols) + " |")
    return "\n".join(lines)


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(df[c].iloc[i]))}</td>" for c in df.columns) + "</tr>"
                   for i in range(len(df)))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:13px}code{background:#f5f5f5;padding:1px 3px}"""


def write_report(out_dir: str | PathLike[str], report: Report) -> Path:
    """Write figures, extra files, report.md, report.html and finally metrics.json into `out_dir`."""
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for fig in report.figures:
        atomic_write_bytes(out / "figures" / fig.name, fig.png)
    for name, data in report.files.items():
        atomic_write_bytes(out / name, data)
    m = report.metrics
    md = [f"# {report.title}", ""]
    hb = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{html.escape(report.title)}</title>",
          f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(report.title)}</h1>"]
    rule = m.get("rule", {}).get("text")
    prov = m.get("provenance", {})
    facts = []
    if prov:
        for k in ("task", "backbone_sha256", "manifest_sha256", "created"):
            v = prov.get(k)
            if isinstance(v, dict):  # the task description: show its name and split sizes
                sizes = ", ".join(f"{s}: {d.get('images')} images / {d.get('patients')} patients"
                                  for s, d in v.get("splits", {}).items())
                v = f"{v.get('task')} ({sizes})"
            if v:
                facts.append(f"{k}: `{v}`")
    if rule:
        facts.append(f"averaging rule: {rule}")
    if m.get("bootstrap"):
        b = m["bootstrap"]
        cal_ci = ci_methods_text(m.get("calibration"))
        facts.append(f"95% CIs: {b.get('level')}-level percentile bootstrap, {b.get('n_boot')} resamples over "
                     f"{b.get('n_clusters')} clusters" + (f" (calibration CIs: {cal_ci})" if cal_ci else ""))
    if m.get("group_rule"):
        facts.append(f"prevalence groups: {m['group_rule']['rule']}")
    facts += report.notes
    md += [f"- {f}" for f in facts] + [""]
    hb.append("<ul class='note'>" + "".join(f"<li>{html.escape(f).replace('`', '')}</li>" for f in facts) + "</ul>")
    tables: list[tuple[str, pd.DataFrame]] = []
    if "macro" in m and "per_finding" in m:
        tables += [("Summary", summary_table(m)), ("Per finding", per_finding_table(m))]
        cal = calibration_table(m)
        if cal is not None:
            bins = m.get("calibration", {}).get("ece_bins")
            cal_ci = ci_methods_text(m.get("calibration"))
            tables.append((f"Calibration (ECE over {bins} equal-mass bins; patient-level bootstrap CIs"
                           + (f": {cal_ci})" if cal_ci else ")"), cal))
    tables += report.tables
    for title, df in tables:
        md += [f"## {title}", "", _md_table(df), ""]
        hb += [f"<h2>{html.escape(title)}</h2>", _html_table(df)]
    for fig in report.figures:
        md += [f"## {fig.title}", "", f"![{fig.title}](figures/{fig.name})", ""]
        if fig.caption:
            md += [fig.caption, ""]
        hb += [f"<h2>{html.escape(fig.title)}</h2>", f"<img src='figures/{html.escape(fig.name)}' alt='{html.escape(fig.title)}'>"]
        if fig.caption:
            hb.append(f"<p class='note'>{html.escape(fig.caption)}</p>")
    md += ["", "All numbers, the exact configuration and data/model hashes are in `metrics.json`."]
    hb += ["<p class='note'>All numbers, the exact configuration and data/model hashes are in "
           "<a href='metrics.json'>metrics.json</a>.</p></body></html>"]
    atomic_write_bytes(out / "report.md", ("\n".join(md) + "\n").encode())
    atomic_write_bytes(out / "report.html", "\n".join(hb).encode())
    write_json(out / "metrics.json", m)
    return out


def predictions_csv(ids: Sequence[str], id_column: str, probs: np.ndarray, findings: Sequence[str]) -> bytes:
    """The `chexfound predict` CSV layout (id column, then one probability column per finding)."""
    p = np.asarray(probs, dtype=np.float64)
    p = p[:, None] if p.ndim == 1 else p
    df = pd.DataFrame(p, columns=list(findings))
    df.insert(0, id_column, list(ids))
    return df.to_csv(index=False, float_format="%.6g").encode()
