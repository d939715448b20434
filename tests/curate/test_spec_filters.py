from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest

from chexfound.curate.filters import exclusion_mask, parse_age, post_filter, pre_filter
from chexfound.curate.sources import list_items
from chexfound.curate.spec import FilterSpec, load_spec
from chexfound.curate.views import parse_views, view_category
from chexfound.errors import ConfigError, ManifestError

EXAMPLE_YAML = """\
sources:
  - {name: nih14, root: ../shared/data/nih14, format: manifest, manifest: labels.csv, patient_column: patient_id}
  - {name: kermany, root: ../shared/data/kermany, format: manifest, manifest: labels.csv, patient_column: patient_key}
  - {name: extra, root: /some/folder, format: folder}
"""


@pytest.fixture()
def project(tmp_path, data_root):
    """A project folder next to ../shared/data, as in the spec format's documented example."""
    (tmp_path / "shared").mkdir()
    os.symlink(data_root, tmp_path / "shared" / "data")
    proj = tmp_path / "proj"
    proj.mkdir()
    extra = tmp_path / "extra"
    (extra / "p1").mkdir(parents=True)
    for name in ("p1/a.png", "p1/b.JPG", "notes.txt"):
        (extra / name).write_bytes(b"x")
    (proj / "corpus.yaml").write_text(EXAMPLE_YAML.replace("/some/folder", str(extra)))
    return proj


def test_example_spec_form_lists_every_image_with_patients(project, data_root):
    spec = load_spec(project / "corpus.yaml")
    assert spec.sources[0].root == str((project / "../shared/data/nih14").resolve())
    items = list_items(spec)
    nih = pd.read_csv(data_root / "nih14/labels.csv", dtype=str)
    ker = pd.read_csv(data_root / "kermany/labels.csv", dtype=str)
    by = items.groupby("source").size().to_dict()
    assert by == {"nih14": len(nih), "kermany": len(ker), "extra": 2}
    row = items[items["source"] == "nih14"].iloc[0]
    assert row["path"] == str(data_root.resolve() / "nih14" / nih["path"][0]) or os.path.samefile(
        row["path"], data_root / "nih14" / nih["path"][0])
    assert row["patient_id"] == f"nih14:{nih['patient_id'][0]}" and row["view"] == nih["view"][0]
    assert items[items["source"] == "kermany"]["patient_raw"].tolist() == ker["patient_key"].tolist()
    extra = items[items["source"] == "extra"]
    assert extra["rel_path"].tolist() == ["p1/a.png", "p1/b.JPG"]
    assert extra["patient_id"].tolist() == ["extra:p1/a", "extra:p1/b"]  # no patient info: one per image
    # a run folder inside a source root is never listed as input
    (project.parent / "extra" / "run" / "cache").mkdir(parents=True)
    (project.parent / "extra" / "run" / "cache" / "c.png").write_bytes(b"x")
    again = list_items(spec, skip=(project.parent / "extra" / "run",))
    assert (again["source"] == "extra").sum() == 2


def test_readers_as_formats(data_root, tmp_path):
    (tmp_path / "s.yaml").write_text(
        f"sources:\n  - {{name: k, root: {data_root / 'kermany'}, format: kermany, limit: 5}}\n"
        f"  - {{name: t, root: {data_root / 'nih14-tiny64'}, format: nih14_shared, limit: 5}}\n")
    items = list_items(load_spec(tmp_path / "s.yaml"))
    assert len(items) == 10 and items["patient_raw"].str.len().min() > 0
    assert set(items.loc[items["source"] == "t", "split"]) <= {"train", "valid", "test"}


@pytest.mark.parametrize("text, match", [
    ("sources: []", "non-empty 'sources'"),
    ("sources:\n  - {name: a, root: /x, colour: red}", "unknown key"),
    ("sources:\n  - {name: a, root: /x}\n  - {name: a, root: /y}", "unique"),
    ("sources:\n  - {name: 'a b', root: /x}", "name"),
    ("sources:\n  - {name: a, root: /x}\ncache: {bit_depth: 12}", "bit_depth"),
    ("sources:\n  - {name: a, root: /x}\nfilters: {views: sideways}", "views"),
    ("sources:\n  - {name: a, root: /x}\ndedup: {phash_threshold: 200}", "phash_threshold"),
])
def test_bad_specs_name_the_file_and_the_problem(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_spec(p)
    assert str(p) in str(e.value)


def test_overrides_and_missing_columns(tmp_path, data_root):
    p = tmp_path / "s.yaml"
    p.write_text(f"sources:\n  - {{name: a, root: {data_root / 'nih14'}, patient_column: nope}}\n")
    spec = load_spec(p, ["cache.size=256", "dedup.phash_threshold=null", "filters.views=frontal"])
    assert spec.cache.size == 256 and spec.dedup.phash_threshold is None and spec.filters.views == "frontal"
    with pytest.raises(ManifestError, match="nope"):
        list_items(spec)


def test_views_ages_and_patients():
    assert parse_views("frontal") == {"frontal"} and parse_views("all") is None
    assert view_category("ap supine") == "frontal" and view_category("LL") == "lateral"
    assert view_category("LAO") == "other" and view_category(float("nan")) is None
    assert parse_age("045Y") == 45 and parse_age("006M") == 0.5 and parse_age(70) == 70
    assert math.isnan(parse_age("unknown")) and math.isnan(parse_age(None))
    items = pd.DataFrame({"source": ["nih14", "nih14-fullres", "kermany", "kermany"],
                          "namespace": ["nih", "nih", "kermany", "kermany"],
                          "patient_raw": ["147", "147", "test:N1-0001", "147"]})
    excl = pd.DataFrame({"source": ["nih"], "patient_id": ["00000147"]})
    assert exclusion_mask(items, excl).tolist() == [True, True, False, False]
    assert exclusion_mask(items, pd.DataFrame({"patient_id": ["147"]})).tolist() == [True, True, False, True]
    # a curated manifest (namespaced ids, its own source column) works as an exclusion list too
    curated = pd.DataFrame({"source": ["nih14-fullres"], "patient_id": ["kermany:test:N1-0001"]})
    assert exclusion_mask(items, curated).tolist() == [False, False, True, False]


def test_pre_and_post_rules():
    items = pd.DataFrame({"source": ["s"] * 5, "namespace": ["s"] * 5, "patient_raw": list("abcde"),
                          "view": ["PA", "LL", None, "AP", "PA"], "modality": ["DX", "DX", "CR", "MR", None],
                          "age": ["30", "40", "50", "60", "10"]})
    f = FilterSpec(views="frontal", modalities=["CR", "DX"], min_age=18, keep_unknown_view=False)
    assert pre_filter(items, f, None).tolist() == ["", "view", "", "modality", "age"]
    ok = {"orig_width": 600, "orig_height": 500}
    # the unknown manifest view is decided from the header, else by keep_unknown_view
    assert post_filter({**ok, "view_position": "PA"}, f, {"view": None}) == ""
    assert post_filter({**ok, "view_position": "LATERAL"}, f, {"view": None}) == "view"
    assert post_filter(ok, f, {"view": None}) == "view"
    g = FilterSpec(min_size=512, max_size=4000)
    assert post_filter({"orig_width": 600, "orig_height": 500}, g, {}) == "min_size"
    assert post_filter({"orig_width": 4096, "orig_height": 4096}, g, {}) == "max_size"
    assert post_filter({**ok, "blank": True}, g, {}) == "blank"
    assert np.all(pre_filter(items, FilterSpec(), None) == "")
