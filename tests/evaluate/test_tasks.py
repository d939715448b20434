"""Task loaders on the shared copies and on tiny synthetic copies of each dataset's release layout."""

import numpy as np
import pandas as pd
import pytest

from chexfound.data import findings as F
from chexfound.errors import ManifestError
from chexfound.data.findings import finding_map as map_findings
from chexfound.evaluate.tasks import load_task


def _patients_disjoint(td):
    df = td.manifest.df
    s = {k: set(df.loc[df["split"] == k, "patient_id"]) for k in ("train", "val", "test")}
    return not (s["train"] & s["test"] or s["train"] & s["val"] or s["val"] & s["test"])


def test_finding_name_mapping_used_for_ood_and_scoring():
    assert map_findings(["Effusion", "Infiltrate", "PNEUMONIA", "Hernia"],
                        ["Pleural Effusion", "Infiltration", "Pneumonia"]) == {
        "Effusion": "Pleural Effusion", "Infiltrate": "Infiltration", "PNEUMONIA": "Pneumonia"}
    assert map_findings(["Mass"], ["Lung Lesion"]) == {}


def _touch(root, rel):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")


def test_nih14_shared(data_root):
    td = load_task("nih14", data_root / "nih14")
    assert "Hernia" not in td.findings and "Pleural_Thickening" in td.findings  # Hernia: 2 positives
    assert _patients_disjoint(td)
    assert set(td.boxes["finding"]) <= set(td.findings) and "Infiltration" in set(td.boxes["finding"])
    d = td.describe()
    assert d["splits"]["test"]["images"] > 50 and len(d["manifest_sha256"]) == 64
    assert load_task("nih14", data_root / "nih14").describe()["manifest_sha256"] == d["manifest_sha256"]
    assert load_task("nih14", data_root / "nih14", seed=1).describe()["manifest_sha256"] != d["manifest_sha256"]


def test_kermany_shared(data_root):
    td = load_task("kermany", data_root / "kermany")
    assert td.findings == ["PNEUMONIA"] and td.kind == "binary" and _patients_disjoint(td)
    df = td.manifest.df
    assert (df["split"] == "test").sum() == 624 and (df["split"] != "test").sum() == 5216
    assert 0.05 < (df["split"] == "val").mean() < 0.15


def test_unknown_task_and_missing_root(tmp_path):
    with pytest.raises(ManifestError, match="unknown task"):
        load_task("imagenet", tmp_path)
    with pytest.raises(ManifestError, match="not found"):
        load_task("nih14", tmp_path / "nope")


def test_nih14_official_layout(tmp_path):
    rows = []
    for i in range(12):
        name = f"{i:08d}_000.png"
        _touch(tmp_path, f"images_001/images/{name}")
        rows.append({"Image Index": name, "Finding Labels": "Effusion|Pleural_Thickening" if i % 3 == 0 else
                     "No Finding", "Patient ID": i // 2, "View Position": "PA"})
    pd.DataFrame(rows).to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    (tmp_path / "test_list.txt").write_text("00000000_000.png\n00000001_000.png\n")
    td = load_task("nih14", tmp_path)
    df = td.manifest.df
    assert df.loc[0, "Effusion"] == 1 and df.loc[0, "Pleural_Thickening"] == 1 and df.loc[1, "Effusion"] == 0
    assert list(df.loc[df["split"] == "test", "image_id"]) == ["00000000_000.png", "00000001_000.png"]
    assert set(df["split"]) == {"train", "val", "test"} and _patients_disjoint(td)
    assert td.manifest.paths()[3].is_file()


def test_chexpert_layout(tmp_path):
    def frame(n, prefix):
        rows = []
        offset = {"train": 0, "valid": 64541, "test": 64741}[prefix]  # the release numbers patients globally
        for i in range(n):
            rel = f"{prefix}/patient{offset + i:05d}/study1/view1_frontal.jpg"
            _touch(tmp_path, rel)
            r = {"Path": f"CheXpert-v1.0-small/{rel}", "Frontal/Lateral": "Frontal"}
            r.update({f: [1.0, 0.0, -1.0, np.nan][(i + k) % 4] for k, f in enumerate(F.CHEXPERT14)})
            rows.append(r)
        lat = rows[0]["Path"].replace("frontal", "lateral")
        _touch(tmp_path, lat.split("/", 1)[1])
        rows.append({**rows[0], "Path": lat, "Frontal/Lateral": "Lateral"})
        return pd.DataFrame(rows)

    frame(40, "train").to_csv(tmp_path / "train.csv", index=False)
    frame(6, "valid").to_csv(tmp_path / "valid.csv", index=False)
    td = load_task("chexpert", tmp_path)
    df = td.manifest.df
    assert td.findings == list(F.CHEXPERT5)
    assert len(df) == 46 and set(df["split"]) == {"train", "val", "test"} and (df["split"] == "test").sum() == 6
    assert set(np.unique(td.labels())) <= {0.0, 1.0}  # U-Zeros and blanks -> 0
    assert _patients_disjoint(td)
    frame(5, "test").to_csv(tmp_path / "test_labels.csv", index=False)
    td2 = load_task("chexpert", tmp_path, uncertain="nan")
    assert (td2.manifest.df["split"] == "val").sum() == 6 and np.isnan(td2.labels()).any()


def test_cxrlt24_layout(tmp_path):
    rng = np.random.default_rng(0)
    for s, n in (("train", 20), ("val", 6), ("test", 8)):
        subj = [10000000 + (i if s == "train" else 100 * (ord(s[0])) + i) for i in range(n)]
        paths = [f"files/p10/p{x}/s5/{s}{i}.jpg" for i, x in enumerate(subj)]
        for p in paths:
            _touch(tmp_path, p)
        df = pd.DataFrame({"fpath": paths, "dicom_id": [f"{s}{i}" for i in range(n)], "study_id": 5})
        for f in F.CXRLT24:
            df[f] = (rng.random(n) < 0.3).astype(int)
        df.to_csv(tmp_path / f"{s}.csv", index=False)
    td = load_task("cxrlt24", tmp_path)
    assert td.findings == list(F.CXRLT24) and len(td.findings) == 40
    assert td.manifest.df["patient_id"].iloc[0] == "10000000" and _patients_disjoint(td)
    assert (td.manifest.df["split"] == "val").sum() == 6
    (tmp_path / "val.csv").unlink()
    td = load_task("cxr-lt", tmp_path)
    assert (td.manifest.df["split"] == "val").sum() == 4  # 20 % of 20 training patients
    bad = pd.read_csv(tmp_path / "test.csv").drop(columns=["Tuberculosis"])
    bad.to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(ManifestError, match="Tuberculosis"):
        load_task("cxrlt24", tmp_path)


def test_mimic_layout(tmp_path):
    split = pd.DataFrame({"dicom_id": ["d1", "d2", "d3", "d4"], "study_id": [1, 1, 2, 3],
                          "subject_id": [10000001, 10000001, 10000002, 10000003],
                          "split": ["train", "train", "validate", "test"]})
    lab = pd.DataFrame({"subject_id": [10000001, 10000002, 10000003], "study_id": [1, 2, 3]})
    for f in F.CHEXPERT14:
        lab[f] = [1.0, -1.0, np.nan]
    meta = split[["dicom_id", "subject_id", "study_id"]].assign(ViewPosition=["PA", "LATERAL", "AP", "PA"])
    split.to_csv(tmp_path / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    lab.to_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    meta.to_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv", index=False)
    for s, st, d in zip(split["subject_id"], split["study_id"], split["dicom_id"]):
        _touch(tmp_path, f"files/p{str(s)[:2]}/p{s}/s{st}/{d}.jpg")
    td = load_task("mimic", tmp_path)
    df = td.manifest.df
    assert list(df["image_id"]) == ["d1", "d3", "d4"]  # lateral dropped
    assert list(df["split"]) == ["train", "val", "test"]
    y = td.labels()
    c = td.findings.index("Atelectasis")
    assert y[0, c] == 1 and np.isnan(y[1, c]) and y[2, c] == 0  # uncertain ignored; blank -> 0


def test_vindr_layout(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    ids = ["a"] * 3 + ["b"] * 3 + [f"c{i}" for i in range(20)]
    tr = pd.DataFrame({"image_id": ids, "rad_id": ["R1", "R2", "R3"] * 2 + ["R1"] * 20})
    for f in F.VINDR_CXR:
        tr[f] = 0
    tr["Aortic enlargement"] = [1, 1, 0, 1, 0, 0] + [0] * 20
    tr["Nodule/Mass"] = [0, 0, 0, 0, 0, 1] + [1] * 20
    tr.to_csv(ann / "image_labels_train.csv", index=False)
    te = pd.DataFrame({"image_id": ["t1", "t2"], **{f: [1, 0] for f in F.VINDR_CXR}})
    te.to_csv(ann / "image_labels_test.csv", index=False)
    for i in set(ids):
        _touch(tmp_path, f"train/{i}.dicom")
    for i in ("t1", "t2"):
        _touch(tmp_path, f"test/{i}.dicom")
    pd.DataFrame({"image_id": ["t1"], "rad_id": ["R8"], "class_name": ["Nodule/Mass"], "x_min": [10.0],
                  "y_min": [20.0], "x_max": [50.0], "y_max": [60.0]}).to_csv(ann / "annotations_test.csv", index=False)
    td = load_task("vindr", tmp_path)
    df = td.manifest.df.set_index("image_id")
    assert df.loc["a", "Aortic enlargement"] == 1 and df.loc["b", "Aortic enlargement"] == 0  # majority vote
    assert df.loc["b", "Nodule/Mass"] == 0 and df.loc["t1", "split"] == "test"
    assert td.boxes.iloc[0][["x", "y", "w", "h"]].tolist() == [10, 20, 40, 40]
