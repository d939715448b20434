"""The one comparison result: models scored on the same test rows, and paired differences between them.

Every "A vs B" the project reports is a `Comparison`: `evaluate --protocol compare`, the demo's paired table
and the pretraining probes' `probe_comparison.json`. One sign convention, written into every file:

    "difference": "model - reference"

so a positive difference means the model scores higher than its reference. A pair is keyed
"<model> - <reference>" and carries both names. `Comparison.text_lines` is the one plain-text table of a
comparison (models with AUROC + CI, then the paired differences). Serialised (`to_dict`):

    {"schema": "chexfound.comparison/1", "difference": "model - reference", "findings": [...],
     "reference": <default reference or null>,
     "models": {name: {"macro": {"auroc", "auroc_ci", ...}, ...}},           # score_predictions' shape
     "paired": {"<model> - <reference>": {"model", "reference",
                "macro": {"auroc": {"model_value", "reference_value", "diff", "ci", "p_value"}, "ap": ...},
                "per_finding": {...}, "subsets": {...}, "config": {...}}},   # or {"model", "reference", "error"}
     "bootstrap": {...}, ...any extra keys (n_train, n_test, probe)}

`read_comparisons` is the one reader of these files. It also reads the pretraining probes' files from before
this schema, where each task held {"auroc": {name: {"auroc", "ci95"}}, "paired": {"teacher_minus_<short>":
{"diff", "ci95", "p_value"}}} (teacher - baseline: the same sign as model - reference, model = teacher).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Mapping

from chexfound.errors import ChexfoundError

SCHEMA = "chexfound.comparison/1"
DIFFERENCE = "model - reference"
NAN_CI = (float("nan"), float("nan"))

# The short names the pretraining probes' old files used for their baselines ("teacher_minus_init").
_LEGACY_SHORT = {"init": "init (iteration 0)", "pixels": "pixels_32x32"}


def _f(v: Any) -> float:
    """A number from a file: JSON null (how NaN is written) back to NaN."""
    return float("nan") if v is None else float(v)


def _ci(v: Any) -> tuple[float, float]:
    v = list(v) if v is not None else [None, None]
    return (_f(v[0]), _f(v[1])) if len(v) == 2 else NAN_CI


def pair_name(model: str, reference: str) -> str:
    """The key of a paired difference: "<model> - <reference>" (the difference's sign)."""
    return f"{model} - {reference}"


@dataclass(frozen=True)
class Difference:
    """One metric's paired difference on the same resamples: model_value - reference_value, its percentile CI
    and the two-sided bootstrap p-value."""

    model_value: float
    reference_value: float
    diff: float
    ci: tuple[float, float]
    p_value: float

    @property
    def excludes_zero(self) -> bool:
        """The CI lies entirely above or below 0 (False when it is undefined)."""
        lo, hi = self.ci
        return not (math.isnan(lo) or math.isnan(hi)) and (lo > 0 or hi < 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: model_value, reference_value, diff, ci, p_value."""
        return {"model_value": self.model_value, "reference_value": self.reference_value, "diff": self.diff,
                "ci": list(self.ci), "p_value": self.p_value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Difference":
        """Back from `to_dict` (also the old files' "ci95" key)."""
        # "a"/"b": `paired_bootstrap`'s own names (A - B)
        return cls(_f(d.get("model_value", d.get("a"))), _f(d.get("reference_value", d.get("b"))),
                   _f(d.get("diff")), _ci(d.get("ci")), _f(d.get("p_value")))


def _differences(d: Mapping[str, Any] | None) -> dict[str, Difference]:
    return {k: Difference.from_dict(v) for k, v in (d or {}).items()}


@dataclass(frozen=True)
class PairedDifference:
    """model - reference on the same test rows and patient resamples: macro differences per metric ("auroc",
    "ap"), and per finding and per named subset of findings where computed. `error` says why a pair could not
    be computed (then there are no numbers)."""

    model: str
    reference: str
    macro: dict[str, Difference] = field(default_factory=dict)
    per_finding: dict[str, dict[str, Difference]] = field(default_factory=dict)
    subsets: dict[str, dict[str, Difference]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def name(self) -> str:
        """"<model> - <reference>": the key of this pair in a Comparison."""
        return pair_name(self.model, self.reference)

    @property
    def auroc(self) -> Difference:
        """The headline: the macro AUROC difference."""
        return self.macro["auroc"]

    @classmethod
    def from_bootstrap(cls, model: str, reference: str, result: Mapping[str, Any]) -> "PairedDifference":
        """From `paired_bootstrap(y, p_model, p_reference, ...)` (A = the model, B = the reference)."""
        return cls(model, reference, _differences(result.get("macro")),
                   {f: _differences(v) for f, v in result.get("per_finding", {}).items()},
                   {s: _differences(v) for s, v in result.get("subsets", {}).items()}, dict(result.get("config", {})))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: model, reference, macro / per_finding / subsets differences (or the error)."""
        if self.error is not None:
            return {"model": self.model, "reference": self.reference, "error": self.error}
        return {"model": self.model, "reference": self.reference,
                "macro": {k: v.to_dict() for k, v in self.macro.items()},
                "per_finding": {f: {k: v.to_dict() for k, v in d.items()} for f, d in self.per_finding.items()},
                "subsets": {s: {k: v.to_dict() for k, v in d.items()} for s, d in self.subsets.items()},
                "config": dict(self.config)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PairedDifference":
        """Back from `to_dict`."""
        if d.get("error") is not None:
            return cls(str(d["model"]), str(d["reference"]), error=str(d["error"]))
        return cls.from_bootstrap(str(d["model"]), str(d["reference"]), d)


@dataclass(frozen=True)
class ModelResult:
    """One model's scores on the test rows: macro AUROC and its CI, plus whatever else its metrics hold
    (`score_predictions`' shape: macro, micro, per_finding, groups, head, ...)."""

    auroc: float
    auroc_ci: tuple[float, float] = NAN_CI
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> "ModelResult":
        """From a model's metrics dict (`score_predictions`' shape); kept whole."""
        macro = metrics.get("macro", {})
        return cls(_f(macro.get("auroc")), _ci(macro.get("auroc_ci")), dict(metrics))

    def to_dict(self) -> dict[str, Any]:
        """The metrics as given, or just the macro AUROC and its CI."""
        if self.metrics:  # the caller's metrics, as given (from_metrics read auroc and its CI from them)
            return dict(self.metrics)
        return {"macro": {"auroc": self.auroc, "auroc_ci": list(self.auroc_ci)}}


@dataclass
class Comparison:
    """Models scored on the same rows and the paired differences model - reference between them."""

    findings: list[str]
    models: dict[str, ModelResult]
    paired: dict[str, PairedDifference] = field(default_factory=dict)
    bootstrap: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None  # the default reference (every other model is compared to it), if any
    extra: dict[str, Any] = field(default_factory=dict)  # n_train, n_test, probe, ...

    def add(self, pair: PairedDifference) -> None:
        """Add (or replace) one paired difference, under its name."""
        self.paired[pair.name] = pair

    def difference(self, model: str, reference: str) -> PairedDifference:
        """The pair model - reference (KeyError naming the pairs there are)."""
        try:
            return self.paired[pair_name(model, reference)]
        except KeyError:
            raise KeyError(f"no paired difference {pair_name(model, reference)!r}; have {list(self.paired)}") from None

    def text_lines(self, title: str, column: str = "model", rows: str = "test rows") -> list[str]:
        """The comparison as a plain-text table (a console, a log): `title` with the sizes (extra's n_train,
        n_test) and what the AUROC is, each model's AUROC and CI under `column`, then each paired difference
        (DIFFERENCE, on the same `rows`; "*": its CI excludes 0). Names wider than the columns widen them."""
        sizes = [f"{k[2:]} {self.extra[k]}" for k in ("n_train", "n_test") if k in self.extra]
        what = f"mean AUROC over {len(self.findings)} findings" if len(self.findings) > 1 else "AUROC"
        level = f"{100 * float(self.bootstrap.get('ci', 0.95)):g}% CI"
        w = max([22, *map(len, self.models)])
        lines = [f"{title} ({', '.join([*sizes, what])})", f"  {column:<{w}} {'AUROC':>7}   {level}"]
        lines += [f"  {k:<{w}} {m.auroc:7.3f}   [{m.auroc_ci[0]:.3f}, {m.auroc_ci[1]:.3f}]"
                  for k, m in self.models.items()]
        if self.paired:
            unit = self.bootstrap.get("unit", "images")
            lines.append(f"  paired difference ({DIFFERENCE}, same {rows}, {level} from a bootstrap over {unit}):")
            w = max([34, *map(len, self.paired)])
            for k, p in self.paired.items():
                if p.error is not None or "auroc" not in p.macro:
                    lines.append(f"  {k:<{w}} not computed: {p.error or 'no AUROC difference'}")
                    continue
                d = p.auroc
                star = "  *" if d.excludes_zero else ""
                lines.append(f"  {k:<{w}} {d.diff:+.3f}   [{d.ci[0]:+.3f}, {d.ci[1]:+.3f}]{star}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the schema and the sign convention stated in the file."""
        return {"schema": SCHEMA, "difference": DIFFERENCE, "findings": list(self.findings),
                "reference": self.reference, "models": {k: v.to_dict() for k, v in self.models.items()},
                "paired": {k: v.to_dict() for k, v in self.paired.items()}, "bootstrap": dict(self.bootstrap),
                **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Comparison":
        """A comparison as written by `to_dict`, or a pretraining probe task from before this schema."""
        if "models" not in d and "auroc" in d:
            return _from_legacy_probe(d)
        schema = d.get("schema", SCHEMA)
        if schema != SCHEMA or d.get("difference", DIFFERENCE) != DIFFERENCE:
            raise ValueError(f"unknown comparison schema {schema!r} (difference {d.get('difference')!r}); "
                             f"this version reads {SCHEMA!r} ({DIFFERENCE})")
        known = {"schema", "difference", "findings", "reference", "models", "paired", "bootstrap"}
        return cls(list(d.get("findings", [])), {k: ModelResult.from_metrics(v) for k, v in d["models"].items()},
                   {k: PairedDifference.from_dict(v) for k, v in d.get("paired", {}).items()},
                   dict(d.get("bootstrap", {})), d.get("reference"), {k: v for k, v in d.items() if k not in known})


def _from_legacy_probe(d: Mapping[str, Any]) -> Comparison:
    """A task of an old probe_comparison.json: {"auroc": {name: {"auroc", "ci95"}}, "paired":
    {"teacher_minus_<short>": {"diff", "ci95", "p_value"}}}. teacher - baseline is model - reference."""
    models = {k: ModelResult(_f(v.get("auroc")), _ci(v.get("ci95"))) for k, v in d["auroc"].items()}

    def full(short: str) -> str:
        if short in models:
            return short
        if short in _LEGACY_SHORT:
            return _LEGACY_SHORT[short]
        if short.startswith("random_seed"):
            return short.replace("random_seed", "random_init_seed")
        return short

    comp = Comparison(list(d.get("findings", [])), models, bootstrap=dict(d.get("bootstrap", {})),
                      extra={k: v for k, v in d.items() if k in ("n_train", "n_test", "probe")})
    for key, v in d.get("paired", {}).items():
        model, sep, short = key.partition("_minus_")
        if not sep:
            raise ValueError(f"old comparison key {key!r} is not '<model>_minus_<reference>'")
        ref = full(short)
        m, r = models.get(model), models.get(ref)
        comp.add(PairedDifference(model, ref, {"auroc": Difference(
            m.auroc if m else float("nan"), r.auroc if r else float("nan"), _f(v.get("diff")), _ci(v.get("ci95")),
            _f(v.get("p_value")))}))
    return comp


def read_comparisons(source: str | PathLike[str] | Mapping[str, Any]) -> dict[str, Comparison]:
    """Comparisons by name from a file (or its parsed JSON): a mapping of names (tasks) to comparisons, as
    probe_comparison.json and the demo write, or one comparison (named "") as `evaluate` writes in
    metrics.json. Old probe_comparison.json files are converted to the current schema."""
    if isinstance(source, Mapping):
        d, where = source, "comparison"
    else:
        where = str(source)
        try:
            d = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ChexfoundError(f"{where}: cannot read a comparison ({e})") from e
    try:
        if "paired" in d and ("models" in d or "auroc" in d):
            return {"": Comparison.from_dict(d)}
        return {k: Comparison.from_dict(v) for k, v in d.items() if isinstance(v, Mapping)}
    except (KeyError, TypeError, ValueError) as e:
        raise ChexfoundError(f"{where}: not a comparison file ({e})") from e
