"""The one comparison result: schema round trip, the sign (model - reference), and old probe files read back."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from chexfound.errors import ChexfoundError
from chexfound.runio import json_safe
from chexfound.stats import (DIFFERENCE, BootstrapConfig, Comparison, PairedDifference, compare_scores,
                             paired_bootstrap, read_comparisons)

DATA = Path(__file__).parent / "data"


def _scores():
    rng = np.random.default_rng(2)
    pats = np.repeat(np.arange(60), 2)
    y = (rng.random((120, 2)) < 0.4).astype(float)
    good = y + rng.normal(scale=0.5, size=y.shape)
    noise = rng.normal(size=y.shape)
    return y, pats, good, noise


def test_difference_is_model_minus_reference_and_says_so():
    y, pats, good, noise = _scores()
    cfg = BootstrapConfig(n_boot=100, seed=1)
    c = compare_scores(y, {"good": good, "noise": noise}, ["A", "B"], pats, cfg=cfg,
                       pairs=[("good", "noise"), ("noise", "good")])
    up, down = c.difference("good", "noise"), c.difference("noise", "good")
    assert up.auroc.diff > 0 and down.auroc.diff == pytest.approx(-up.auroc.diff)
    assert up.auroc.diff == pytest.approx(c.models["good"].auroc - c.models["noise"].auroc)
    assert up.auroc.model_value == pytest.approx(c.models["good"].auroc)
    # the same numbers as the paired bootstrap of A = model, B = reference
    raw = paired_bootstrap(y, good, noise, ["A", "B"], pats, cfg)["macro"]["auroc"]
    assert (up.auroc.diff, list(up.auroc.ci), up.auroc.p_value) == (raw["diff"], raw["ci"], raw["p_value"])
    d = c.to_dict()
    assert d["difference"] == DIFFERENCE == "model - reference" and d["schema"] == "chexfound.comparison/1"
    assert set(d["paired"]) == {"good - noise", "noise - good"}
    assert d["paired"]["good - noise"]["model"] == "good" and d["paired"]["good - noise"]["reference"] == "noise"


def test_round_trip_through_json_keeps_every_number(tmp_path):
    y, pats, good, noise = _scores()
    c = compare_scores(y, {"good": good, "noise": noise}, ["A", "B"], pats, "noise", BootstrapConfig(n_boot=50))
    c.extra = {"n_train": 10, "n_test": 120}
    f = tmp_path / "comparison.json"
    f.write_text(json.dumps(json_safe({"kermany": c.to_dict()})))
    back = read_comparisons(f)["kermany"]
    assert back.to_dict() == json.loads(json.dumps(json_safe(c.to_dict())))
    assert back.reference == "noise" and back.extra == {"n_train": 10, "n_test": 120}
    assert back.difference("good", "noise").per_finding["A"]["auroc"].diff == \
        c.difference("good", "noise").per_finding["A"]["auroc"].diff
    # a single comparison (evaluate's metrics.json holds one beside its other keys) reads as ""
    assert set(read_comparisons({**c.to_dict(), "protocol": "compare"})) == {""}


def test_an_old_probe_comparison_file_reads_as_the_new_schema_with_the_same_sign():
    old = json.loads((DATA / "probe_comparison_v0.json").read_text())
    comps = read_comparisons(DATA / "probe_comparison_v0.json")
    assert set(comps) == {"kermany", "nih14"}
    for task, c in comps.items():
        o = old[task]
        assert c.findings == o["findings"] and c.extra["n_test"] == o["n_test"] and c.bootstrap == o["bootstrap"]
        assert list(c.models) == list(o["auroc"])
        for name, v in o["auroc"].items():
            assert c.models[name].auroc == v["auroc"] and list(c.models[name].auroc_ci) == v["ci95"]
        # teacher_minus_X was teacher - X: the model is the teacher, the reference X under its full name
        refs = {"init": "init (iteration 0)", "pixels": "pixels_32x32", **{
            f"random_seed{k}": f"random_init_seed{k}" for k in range(3)}}
        assert set(c.paired) == {f"teacher - {r}" for r in refs.values()}
        for short, ref in refs.items():
            p, v = c.difference("teacher", ref), o["paired"][f"teacher_minus_{short}"]
            assert (p.auroc.diff, list(p.auroc.ci), p.auroc.p_value) == (v["diff"], v["ci95"], v["p_value"])
            assert p.auroc.model_value - p.auroc.reference_value == pytest.approx(v["diff"], abs=1e-9)
        # converted, it writes the new schema
        assert Comparison.from_dict(c.to_dict()).to_dict() == c.to_dict()


def test_an_old_file_without_p_values_or_bootstrap_settings_reads():
    c = read_comparisons(DATA / "probe_comparison_v0_no_p.json")["kermany"]
    pixels, init = c.difference("teacher", "pixels_32x32").auroc, c.difference("teacher", "init (iteration 0)").auroc
    assert math.isnan(pixels.p_value) and c.bootstrap == {}
    assert pixels.diff < 0 and pixels.ci[0] < 0 < pixels.ci[1] and not pixels.excludes_zero
    assert init.diff > 0 and init.ci[0] > 0 and init.excludes_zero


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "probe_comparison.json"
    bad.write_text("{not json")
    with pytest.raises(ChexfoundError, match="probe_comparison.json"):
        read_comparisons(bad)
    bad.write_text(json.dumps({"kermany": {"schema": "other/9", "models": {}, "paired": {}}}))
    with pytest.raises(ChexfoundError, match="unknown comparison schema"):
        read_comparisons(bad)
    bad.write_text(json.dumps({"kermany": {"auroc": {"teacher": {"auroc": 0.5}}, "paired": {"weird": {}}}}))
    with pytest.raises(ChexfoundError, match="weird"):
        read_comparisons(bad)


def test_text_lines_show_every_model_and_every_signed_difference():
    y, pats, good, noise = _scores()
    c = compare_scores(y, {"good": good, "noise": noise}, ["A", "B"], pats, cfg=BootstrapConfig(n_boot=100, seed=1),
                       pairs=[("good", "noise"), ("noise", "good")])
    c.extra = {"n_train": 10, "n_test": 120}
    c.add(PairedDifference("good", "absent", error="no scores for 'absent'"))
    lines = c.text_lines("probe: toy", "features", "test images")
    assert lines[0] == "probe: toy (train 10, test 120, mean AUROC over 2 findings)"
    assert lines[1].split() == ["features", "AUROC", "95%", "CI"]
    for name, m in c.models.items():
        row = next(line for line in lines if line.split()[0] == name)
        assert f"{m.auroc:.3f}" in row and f"[{m.auroc_ci[0]:.3f}, {m.auroc_ci[1]:.3f}]" in row
    assert lines[4] == ("  paired difference (model - reference, same test images, 95% CI from a bootstrap over "
                        "patients):")
    up, down = (next(line for line in lines if line.strip().startswith(k)) for k in ("good - noise", "noise - good"))
    d = c.difference("good", "noise").auroc
    assert f"+{d.diff:.3f}" in up and f"-{d.diff:.3f}" in down and d.diff > 0
    assert up.endswith("  *") == d.excludes_zero and down.endswith("  *") == d.excludes_zero
    assert lines[-1].split("not computed: ")[1] == "no scores for 'absent'"
    # one finding: its AUROC; a name wider than the column widens it and keeps the numbers aligned
    one = compare_scores(y[:, :1], {"a model with a long name": good[:, :1], "b": noise[:, :1]}, ["A"], pats, "b",
                         BootstrapConfig(n_boot=20))
    title, header, *rows = one.text_lines("t", rows="images")[:4]
    assert title == "t (AUROC)" and {header.index("95% CI")} == {r.index("[") for r in rows}
