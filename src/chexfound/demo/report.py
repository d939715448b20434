"""The demo's report: one summary table (pretrained vs random vs pixels, GLoRI vs linear, with CIs), the
paired differences, figures, and a plain statement of what the numbers do and do not show."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from chexfound.evaluate.report import Figure, Report, ci_methods_text, write_report
from chexfound.runio import atomic_write_json, json_safe
from chexfound.stats import DIFFERENCE, PairedDifference, read_comparisons


def _ci(m: dict[str, Any], k: str) -> str:
    v = m.get(k)
    lo, hi = (m.get(f"{k}_ci") or [None, None])[:2]
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    if lo is None or hi is None or np.isnan(lo) or np.isnan(hi):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def summary_rows(results: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for key, res in results["models"].items():
        which, task = key.split("/")
        if which == "pixels":
            heads = {"logistic (32x32 pixels)": res}
        else:
            heads = res["heads"]
        for head, r in heads.items():
            mac = r["metrics"]["macro"]
            rows.append({"task": task, "backbone": which, "head": head, "test macro AUROC [95% CI]": _ci(mac, "auroc"),
                         "test macro AP [95% CI]": _ci(mac, "ap")})
    return pd.DataFrame(rows).sort_values(["task", "head", "backbone"]).reset_index(drop=True)


def _pairs(results: dict[str, Any]) -> list[tuple[str, PairedDifference]]:
    """("<task>: <model> - <reference>", pair) for every paired difference, read through the one reader of
    comparisons (a results.json reloaded on a rerun holds null where a number was NaN)."""
    return [(f"{task}: {name}", p) for task, c in read_comparisons(results.get("comparison", {})).items()
            for name, p in c.paired.items()]


def paired_rows(results: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for name, p in _pairs(results):
        if p.error is not None:
            rows.append({"comparison": name, "AUROC difference [95% CI]": p.error, "p": ""})
            continue
        a = p.auroc
        lo, hi = a.ci
        rows.append({"comparison": name, "AUROC difference [95% CI]": f"{a.diff:+.3f} [{lo:+.3f}, {hi:+.3f}]",
                     "CI excludes 0": "yes" if a.excludes_zero else "no", "p": f"{a.p_value:.3f}"})
    return pd.DataFrame(rows)


def verdicts(results: dict[str, Any]) -> list[str]:
    """Plain sentences that say exactly what the paired CIs show (model - reference: the first named is the
    model)."""
    out = []
    for name, p in _pairs(results):
        if p.error is not None:
            continue
        a = p.auroc
        lo, hi = a.ci
        if np.isnan(lo) or np.isnan(hi):
            continue
        diff = f"{a.diff:+.3f} (95% CI {lo:+.3f} to {hi:+.3f})"
        if lo > 0:
            out.append(f"{name}: {diff} on test macro AUROC: the first is better.")
        elif hi < 0:
            out.append(f"{name}: {diff} on test macro AUROC: the first is WORSE.")
        else:
            out.append(f"{name}: {diff} on test macro AUROC: no clear difference (the CI includes 0).")
    return out


def call_notes(results: dict[str, Any]) -> list[str]:
    """Positive calls per test image at each head's thresholds, and which rules chose them."""
    out = []
    for key, res in results["models"].items():
        heads = {"logistic (32x32 pixels)": res} if key.startswith("pixels/") else res.get("heads", {})
        for head, r in heads.items():
            c, rules = r.get("calls"), [t.get("rule") for t in r.get("threshold_rules", [])]
            if not c or c.get("n_findings", 0) < 2:
                continue
            by_rule = ", ".join(f"{rules.count(x)} {x}" for x in dict.fromkeys(rules))
            out.append(f"{key} {head}: {c['calls_per_image']:.1f} positive calls per test image of "
                       f"{c['n_findings']} findings (labels: {c['labels_per_image']:.1f}); thresholds by rule: "
                       f"{by_rule or 'n/a'} (validation-optimal only with strong validation evidence, else the "
                       "training prevalence)")
    return out


def _number(v: Any) -> float:
    """A float from a value a reloaded results.json may hold as null."""
    return float("nan") if v is None else float(v)


def _heads(results: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(task, backbone, head, result) for every trained head (the pixel baseline included)."""
    out = []
    for key, res in results["models"].items():
        which, task = key.split("/")
        heads = {"logistic (32x32 pixels)": res} if which == "pixels" else res.get("heads", {})
        out += [(task, which, head, r) for head, r in heads.items()]
    return out


def calibration_rows(results: dict[str, Any]) -> pd.DataFrame:
    """Per head: test Brier and ECE with CIs, and for heads with a post-hoc calibrator the same before it."""
    rows = []
    for task, which, head, r in _heads(results):
        mac = r.get("metrics", {}).get("macro", {})
        if "ece" not in mac:
            continue
        before = (r["metrics"].get("calibration_before") or {}).get("macro", {})
        methods = r.get("calibration") or []
        rows.append({"task": task, "backbone": which, "head": head,
                     "calibrator (per finding)": ", ".join(f"{methods.count(m)} {m}" for m in dict.fromkeys(methods))
                     or "none (logistic probe)",
                     "test ECE before [95% CI]": _ci(before, "ece") if before else "-",
                     "test ECE [95% CI]": _ci(mac, "ece"),
                     "test Brier before": _ci(before, "brier") if before else "-",
                     "test Brier [95% CI]": _ci(mac, "brier"),
                     "calibration slope [95% CI]": _ci(mac, "cal_slope")})
    return pd.DataFrame(rows)


def calibration_ci_methods(results: dict[str, Any]) -> str:
    """Which bootstrap interval each calibration CI of the heads' test metrics is (the first head that says)."""
    for _task, _which, _head, r in _heads(results):
        text = ci_methods_text(r.get("metrics", {}).get("calibration"))
        if text:
            return text
    return ""


def what_the_numbers_show(results: dict[str, Any]) -> list[str]:
    """Plain sentences for the numbers a reader would otherwise have to interpret: chance-level heads, heads
    that are uninformative (and so call nothing), calibration before/after, and attention that does not
    point at findings."""
    out = []
    for task, which, head, r in _heads(results):
        mac = r.get("metrics", {}).get("macro", {})
        lo = _number((mac.get("auroc_ci") or [None, None])[0])
        name = f"{task} {head} ({which})"
        if np.isfinite(lo) and lo <= 0.5:
            out.append(f"{name}: test macro AUROC {_ci(mac, 'auroc')}: the CI includes chance (0.5), so this "
                       "head is not shown to rank images better than a coin.")
        inf = r.get("informative") or {}
        spread = inf.get("mean_logit_spread")
        spread_txt = f" (mean logit spread of its validation outputs {spread:.3g})" if spread is not None else ""
        if inf.get("informative") is False:
            out.append(f"{name} is uninformative: {inf.get('reason')}{spread_txt}. predict, serve and the page "
                       "show its probabilities but call no finding positive or negative.")
        elif inf.get("uninformative_findings"):
            names = inf["uninformative_findings"]
            out.append(f"{name}: {len(names)} finding(s) get no call (near-random, too little validation evidence "
                       f"or outputs that barely vary): {', '.join(names)}.")
        before = (r.get("metrics", {}).get("calibration_before") or {})
        if before:
            b, a = before["macro"], mac
            b_lo, b_hi = map(_number, b.get("ece_ci") or [None, None])
            a_lo, a_hi = map(_number, a.get("ece_ci") or [None, None])
            change = ("lower: the calibrator helped" if a_hi < b_lo else "higher: the calibrator made it worse"
                      if a_lo > b_hi else "the CIs overlap: no clear change")
            out.append(f"{name}: test ECE {_ci(b, 'ece')} before the post-hoc calibrator (fitted on validation), "
                       f"{_ci(a, 'ece')} after; {change}. AUROC changed by at most "
                       f"{_number(before.get('max_abs_auroc_change')):.2g} (monotone calibrators keep the ranking).")
    for which, loc in (results.get("localisation") or {}).items():
        o = loc.get("overall", {})
        n, pt, cp = o.get("n_items"), o.get("pointing"), o.get("centre_pointing")
        if not n or pt is None or cp is None:
            continue
        hits = int(round(pt * n))
        hi = _number((o.get("pointing_ci") or [None, None])[1])
        c_lo = _number((o.get("centre_pointing_ci") or [None, None])[0])
        verdict = ("worse than a fixed guess at the image centre: this attention does not point at findings"
                   if hi < c_lo else "no clear difference from a fixed guess at the image centre"
                   if pt <= cp else "more often than the centre prior")
        out.append(f"GLoRI attention ({which} backbone) points inside an expert box in {hits} of {n} test boxes "
                   f"(pointing game {_ci(o, 'pointing')}), against {cp:.3f} for a centre prior: {verdict}.")
    return out


def label_efficiency_png(le: dict[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for name, style in (("pretrained", "o-"), ("random", "s--"), ("pixels", "^:")):
        if name not in le:
            continue
        c = le[name]["curve"]
        x = [p["fraction"] * 100 for p in c]
        y = np.array([p["auroc_mean"] for p in c], dtype=float)
        s = np.array([p.get("auroc_std", 0.0) or 0.0 for p in c], dtype=float)
        ax.plot(x, y, style, label={"pretrained": "pretrained ViT (linear)", "random": "random-init ViT (linear)",
                                     "pixels": "32x32 pixels (logistic)"}[name])
        ax.fill_between(x, y - s, y + s, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("training patients used (%)")
    ax.set_ylabel("Kermany test AUROC (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def summarise_and_write(cfg: Any, results: dict[str, Any], echo: Callable[[str], None]) -> Path:
    from chexfound.evaluate.figures import roc_pr_grid

    out = Path(cfg.out)
    summary = summary_rows(results)
    pairs = paired_rows(results)
    pre = results["pretrain"]
    cal_ci = calibration_ci_methods(results)
    notes = [
        f"pretrained backbone: {pre['source']}; architecture {pre['config'].get('name') or 'custom'} "
        f"(dim {pre['config']['embed_dim']}, depth {pre['config']['depth']}, patch {pre['config']['patch_size']}, "
        f"{pre['transform']['size']} px)",
        f"pretraining run in {pre['run_dir']}: {pre['iterations']} iterations, loss {pre['loss_first']:.3f} -> "
        f"{pre['loss_last']:.3f} ({'fell' if pre['loss_fell'] else 'did NOT fall'})",
        "95% CIs: patient-level percentile bootstrap; paired differences use the same resamples for both models"
        + (f"; calibration CIs: {cal_ci} (ECE's resamples sit above its estimate, as resampling adds binning "
           "noise, so on test sets this small its plain percentile interval can lie wholly above the estimate; "
           "chexfound.stats.calibration)" if cal_ci else "") + ".",
        "linear heads and the pixel baseline: the one logistic probe of chexfound.stats (C chosen on validation "
        "macro AUROC), the same computation as the pretraining probes' final comparison.",
    ] + call_notes(results) + [
        "This is a tiny ViT pretrained for minutes on a few thousand images: it shows the pipeline working "
        "and measured honestly, not CheXFound's performance (ViT-L/16, ~1M images, 8 GPUs).",
        "Data: NIH ChestX-ray14 (Wang et al., CVPR 2017; NIH Clinical Center) and Kermany et al. (Cell 2018, "
        "CC BY 4.0).",
    ] + verdicts(results) + what_the_numbers_show(results)
    figures = []
    le = results.get("label_efficiency")
    if le:
        figures.append(Figure("label_efficiency.png", "Label efficiency on Kermany", label_efficiency_png(le),
                              "Mean over seeds; band: +-1 SD. Each point retrains the head on that share of "
                              "training patients."))
    # ROC/PR on Kermany test for the three models.
    try:
        from chexfound.data.manifest import read_manifest

        m = read_manifest(out / "data" / "kermany.csv", labels=["PNEUMONIA"])
        test = np.flatnonzero(m.df["split"].astype(str).to_numpy() == "test")
        preds = {}
        for name, f in (("pretrained", "pretrained/kermany-linear"), ("random", "random/kermany-linear"),
                        ("pixels", "pixels-kermany")):
            p = out / "cache" / f"{f}-test-probs.npy"
            if p.is_file() and len(np.load(p)) == len(test):
                preds[name] = np.load(p)
        if preds:
            figures.append(Figure("kermany_roc.png", "Kermany test ROC", roc_pr_grid(m.labels()[test], preds, ["PNEUMONIA"], "roc")))
    except Exception as e:  # a figure must never lose the report
        notes.append(f"(ROC figure skipped: {e})")
    try:  # reliability diagrams: NIH GLoRI before/after its calibrator, and the linear probes
        from chexfound.data.manifest import read_manifest
        from chexfound.evaluate.figures import reliability_grid

        nih = results.get("models", {}).get("pretrained/nih14", {})
        findings = list(results.get("data", {}).get("nih14_findings") or [])
        if nih and findings:
            m = read_manifest(out / "data" / "nih14.csv", labels=findings)
            test = np.flatnonzero(m.df["split"].astype(str).to_numpy() == "test")
            base = out / "cache" / "pretrained"
            curves = {label: np.load(base / f) for label, f in (
                ("GLoRI before calibration", "nih14-glori-test-probs-uncalibrated.npy"),
                ("GLoRI after", "nih14-glori-test-probs.npy"), ("linear probe", "nih14-linear-test-probs.npy"))
                if (base / f).is_file()}
            curves = {k: v for k, v in curves.items() if len(v) == len(test)}
            if curves:
                figures.append(Figure("reliability_nih14.png", "Reliability on NIH-14 test (pretrained backbone)",
                                      reliability_grid(m.labels()[test], curves, findings,
                                                       nih["heads"].get("glori", {}).get("metrics", {})
                                                       .get("per_finding")),
                                      "Observed positive rate against mean prediction in 10 equal-mass bins "
                                      "(Wilson 95% intervals); dotted: perfect calibration; beneath: histogram."))
    except Exception as e:  # a figure must never lose the report
        notes.append(f"(reliability figure skipped: {e})")
    for which in ("pretrained", "random"):
        p = out / "figures" / f"localisation-{which}.png"
        if p.is_file():
            figures.append(Figure(p.name, f"GLoRI attention vs NIH boxes ({which} backbone)", p.read_bytes(),
                                  "Boxes: NIH expert annotations; title marks pointing-game hits."))
    loc_rows = []
    for which, r in (results.get("localisation") or {}).items():
        o = r.get("overall", {})
        loc_rows.append({"backbone": which, "items": o.get("n_items"),
                         "pointing (GLoRI)": _ci(o, "pointing"), "pointing (centre prior)": _ci(o, "centre_pointing"),
                         "mass in boxes (GLoRI)": _ci(o, "mass"), "mass (centre prior)": _ci(o, "centre_mass"),
                         "mass (uniform)": f"{o.get('uniform_mass', float('nan')):.3f}"})
    tables = [("Summary: test sets", summary), (f"Paired differences ({DIFFERENCE})", pairs)]
    cal = calibration_rows(results)
    if len(cal):
        tables.append(("Calibration on the test sets (ECE: 10 equal-mass bins; patient-level bootstrap 95% CIs"
                       + (f": {cal_ci}" if cal_ci else "") + ")", cal))
    if loc_rows:
        tables.append(("Localisation on NIH test boxes", pd.DataFrame(loc_rows)))
    heat = results.get("heatmaps", {}).get("files", [])
    if heat:
        notes.append(f"heatmap overlays: {len(heat)} PNGs in heatmaps/ (top-3 findings per image, GLoRI attention)")
    timings = results.get("timings_s", {})
    notes.append("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    report = Report("chexfound demo: pretrain, adapt, evaluate, explain", json_safe(results), figures,
                    tables, notes)
    write_report(out, report)
    atomic_write_json(out / "report.json", results, indent=1)
    echo("")
    echo(summary.to_string(index=False))
    echo("")
    echo(pairs.to_string(index=False))
    if loc_rows:
        echo("")
        echo(pd.DataFrame(loc_rows).to_string(index=False))
    echo("")
    for v in verdicts(results) + what_the_numbers_show(results):
        echo("  " + v)
    echo(f"\nreport: {out / 'report.html'}  (numbers: {out / 'report.json'}; models: {out / 'models'})")
    return out
