"""Ready-made evaluation tasks: public CXR datasets as (manifest with train/val/test split, findings).

Every loader returns a `TaskData` whose manifest has a `split` column (train / val / test, patient-disjoint
where the dataset has patient ids) and exactly one label column per task finding, named as the finding.
Official splits are used where the dataset has them; otherwise a seeded patient-level split is made and
recorded. Loaders accept each dataset's own release layout and, where it exists, the layout of the copies
under ../shared/data.

| task     | findings                                | splits                                                    |
|----------|-----------------------------------------|-----------------------------------------------------------|
| nih14    | 14 NIH findings                         | official train_val/test lists, val = 10 % of train_val patients; shared subset: 70/10/20 by patient |
| chexpert | 5 competition findings, U-Zeros, frontal| train.csv / valid.csv (val) / test labels (test); without a test file valid is the test set and val is 5 % of train patients |
| cxrlt24  | the 40 CXR-LT 2024 findings (logit order)| {train,val,test}.csv as the CheXFound authors split them   |
| mimic    | 14 CheXpert-style labels, frontal       | official mimic-cxr-2.0.0-split                            |
| vindr    | VinDr-CXR image-level labels            | official train / test, val = 10 % of train images         |
| kermany  | Pneumonia (binary)                      | official train / test, val = 10 % of train patients       |
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from chexfound.data import findings as F
from chexfound.data.manifest import Manifest, patient_split, read_manifest
from chexfound.errors import ManifestError
from chexfound.evaluate.findings_map import rename_to
from chexfound.evaluate.localisation import read_boxes
from chexfound.models.format import sha256_file


@dataclass
class TaskData:
    name: str
    manifest: Manifest
    findings: list[str]
    kind: str = "multilabel"
    boxes: pd.DataFrame | None = None
    sources: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def split_mask(self, name: str) -> np.ndarray:
        return self.manifest.df["split"].astype(str).to_numpy() == name

    def indices(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.split_mask(name))

    def labels(self) -> np.ndarray:
        return self.manifest.labels("nan")

    def describe(self) -> dict[str, Any]:
        """Identity of the data for reports: counts, source file hashes and a hash of the manifest itself."""
        import hashlib

        df = self.manifest.df
        return {
            "task": self.name,
            "kind": self.kind,
            "findings": list(self.findings),
            "n_images": int(len(df)),
            "splits": {s: {"images": int((df["split"] == s).sum()),
                           "patients": int(df.loc[df["split"] == s, "patient_id"].nunique())}
                       for s in ("train", "val", "test")},
            "manifest_sha256": hashlib.sha256(df.to_csv(index=False).encode()).hexdigest(),
            "sources": {str(p): sha256_file(p) for p in self.sources if Path(p).is_file()},
            "notes": list(self.notes),
        }


TaskLoader = Callable[..., TaskData]
TASKS: dict[str, TaskLoader] = {}


def register_task(name: str) -> Callable[[TaskLoader], TaskLoader]:
    def deco(fn: TaskLoader) -> TaskLoader:
        TASKS[name.lower()] = fn
        return fn

    return deco


def load_task(name: str, root: str | PathLike[str], seed: int = 0, **kw: Any) -> TaskData:
    key = name.lower().replace("-", "").replace("_", "")
    aliases = {"nih": "nih14", "chestxray14": "nih14", "cxrlt": "cxrlt24", "cxrlt2024": "cxrlt24",
               "mimiccxr": "mimic", "vindrcxr": "vindr"}
    key = aliases.get(key, key)
    if key not in TASKS:
        raise ManifestError(None, f"unknown task {name!r}; known: {sorted(TASKS)}")
    r = Path(root)
    if not r.is_dir():
        raise ManifestError(r, f"data root for task {key!r} not found")
    td = TASKS[key](r, seed=seed, **kw)
    _check(td)
    return td


def _check(td: TaskData) -> None:
    df = td.manifest.df
    missing = [f for f in td.findings if f not in df.columns]
    if missing:
        raise ManifestError(td.manifest.source, f"task {td.name}: label column(s) {missing} missing")
    for s in ("train", "test"):
        if not (df["split"] == s).any():
            raise ManifestError(td.manifest.source, f"task {td.name}: no '{s}' images")
    tr = set(df.loc[df["split"] == "train", "patient_id"].astype(str))
    te = set(df.loc[df["split"] == "test", "patient_id"].astype(str))
    if tr & te:
        raise ManifestError(td.manifest.source,
                            f"task {td.name}: {len(tr & te)} patient(s) in both train and test, e.g. {sorted(tr & te)[:3]}")


def _carve_val(df: pd.DataFrame, frac: float, seed: int, from_split: str = "train") -> pd.DataFrame:
    """Move `frac` of the patients of `from_split` to 'val' (seeded, by patient)."""
    m = df["split"] == from_split
    pats = df.loc[m, "patient_id"].astype(str).to_numpy()
    sub = patient_split(pats, (1 - frac, frac), (from_split, "val"), seed=seed)
    df = df.copy()
    df.loc[m, "split"] = sub
    return df


def _make(df: pd.DataFrame, root: Path, findings: Sequence[str], source: Path | None) -> Manifest:
    return Manifest(df.reset_index(drop=True), root, list(findings), source)


def _first(root: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        for cand in (root / n, root / (n + ".gz")):
            if cand.is_file():
                return cand
    return None


# --- NIH ChestX-ray14 -------------------------------------------------------------------------------------

def _drop_rare(td: TaskData, min_total_pos: int) -> TaskData:
    y = td.manifest.labels()
    keep = [f for c, f in enumerate(td.findings) if np.nansum(y[:, c] == 1) >= min_total_pos]
    dropped = [f for f in td.findings if f not in keep]
    if dropped:
        td.notes.append(f"left out {dropped}: fewer than {min_total_pos} positive images in the whole set")
        td.findings = keep
        td.manifest.label_columns = keep
    return td


@register_task("nih14")
def load_nih14(root: Path, seed: int = 0, image_root: str | None = None, min_total_pos: int = 5) -> TaskData:
    """NIH ChestX-ray14: the official release (Data_Entry_2017*.csv, train_val_list.txt, test_list.txt,
    images*/) or the shared subset layout (labels.csv [+ boxes.csv])."""
    names = list(F.NIH14)
    if (root / "labels.csv").is_file():
        m = read_manifest(root / "labels.csv", root=image_root)
        ren = rename_to(list(m.df.columns), names)  # e.g. Pleural_Thickening -> Pleural Thickening
        df = m.df.rename(columns=ren)
        df["split"] = patient_split(df["patient_id"].astype(str).to_numpy(), (0.7, 0.1, 0.2), seed=seed)
        td = TaskData("nih14", _make(df, m.root, names, m.source), names, sources=[m.source])
        td.notes.append(f"patient-level 70/10/20 split, seed {seed} (subset without official split)")
        td = _drop_rare(td, min_total_pos)
        box_file = root / "boxes.csv"
    else:
        entry = _first(root, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"])
        if entry is None:
            raise ManifestError(root, "neither labels.csv nor Data_Entry_2017*.csv found (NIH ChestX-ray14)")
        raw = pd.read_csv(entry)
        img_dir = Path(image_root) if image_root else root
        index = {p.name: p for p in img_dir.glob("**/*.png")}
        df = pd.DataFrame({
            "path": [str(index.get(i, Path("images") / i)) for i in raw["Image Index"]],
            "image_id": raw["Image Index"].astype(str),
            "patient_id": raw["Patient ID"].astype(str),
            "view": raw.get("View Position", pd.Series([""] * len(raw))).astype(str),
        })
        labs = raw["Finding Labels"].astype(str).str.split("|")
        canon = {n.replace(" ", "_").lower(): n for n in names}
        for n in names:
            df[n] = 0.0
        for i, ls in enumerate(labs):
            for lab in ls:
                key = lab.strip().replace(" ", "_").lower()
                if key in canon:
                    df.iat[i, df.columns.get_loc(canon[key])] = 1.0
        test_list = root / "test_list.txt"
        if not test_list.is_file():
            raise ManifestError(test_list, "official NIH test list not found")
        test_ids = set(test_list.read_text().split())
        df["split"] = np.where(df["image_id"].isin(test_ids), "test", "train")
        df = _carve_val(df, 0.1, seed)
        td = TaskData("nih14", _make(df, img_dir, names, entry), names, sources=[entry, test_list])
        td.notes.append(f"official test list; val = 10% of train_val patients (seed {seed})")
        box_file = _first(root, ["BBox_List_2017.csv"]) or root / "boxes.csv"
    if box_file.is_file():
        b = read_boxes(box_file)
        td.boxes = b.assign(finding=b["finding"].replace(rename_to(sorted(set(b["finding"])), td.findings)))
        td.sources.append(box_file)
    return td


# --- Kermany paediatric pneumonia ------------------------------------------------------------------------

_KERMANY_PATIENT = re.compile(r"^(person\d+|IM-\d+|NORMAL2-IM-\d+)", re.IGNORECASE)


@register_task("kermany")
def load_kermany(root: Path, seed: int = 0, image_root: str | None = None, val_frac: float = 0.1) -> TaskData:
    """Kermany et al. 2018: shared labels.csv, or the release folders {train,val,test}/{NORMAL,PNEUMONIA}.
    The tiny official val folder (16 images) is merged into train; val = `val_frac` of train patients."""
    if (root / "labels.csv").is_file():
        from chexfound.data.readers import read_kermany

        m = read_kermany(root)
        df = m.df.rename(columns={"PNEUMONIA": "Pneumonia"})
        base, src = m.root if image_root is None else Path(image_root), m.source
    else:
        rows = []
        top = root / "chest_xray" if (root / "chest_xray").is_dir() else root
        for split in ("train", "val", "test"):
            for cls in ("NORMAL", "PNEUMONIA"):
                for p in sorted((top / split / cls).glob("*.jpeg")):
                    mm = _KERMANY_PATIENT.match(p.name)
                    pid = mm.group(1) if mm else p.stem
                    rows.append({"path": str(p.relative_to(top)), "split": "train" if split == "val" else split,
                                 "patient_id": f"{'test' if split == 'test' else 'train'}:{pid}",
                                 "Pneumonia": float(cls == "PNEUMONIA")})
        if not rows:
            raise ManifestError(root, "no labels.csv and no {train,test}/{NORMAL,PNEUMONIA}/*.jpeg folders (Kermany)")
        df = pd.DataFrame(rows)
        base, src = top if image_root is None else Path(image_root), None
    df = _carve_val(df, val_frac, seed)
    td = TaskData("kermany", _make(df, base, ["Pneumonia"], src), ["Pneumonia"], kind="binary",
                  sources=[src] if src else [])
    td.notes.append(f"official train/test; val = {val_frac:.0%} of train patients (seed {seed})")
    return td


# --- CheXpert ---------------------------------------------------------------------------------------------

def _chexpert_frame(csv: Path, root: Path, split: str, uncertain: str) -> pd.DataFrame:
    raw = pd.read_csv(csv)
    path_col = "Path" if "Path" in raw.columns else "path"
    if path_col not in raw.columns:
        raise ManifestError(csv, f"no Path column; columns: {list(raw.columns)}")
    missing = [f for f in F.CHEXPERT5 if f not in raw.columns]
    if missing:
        raise ManifestError(csv, f"missing CheXpert label column(s) {missing}")
    if "Frontal/Lateral" in raw.columns:
        raw = raw[raw["Frontal/Lateral"].astype(str) == "Frontal"]
    else:
        raw = raw[raw[path_col].astype(str).str.contains("frontal")]
    # Release paths start with the dataset folder (CheXpert-v1.0-small/train/...): make them root-relative.
    paths = raw[path_col].astype(str).str.replace(r"^CheXpert-v1\.0[^/]*/", "", regex=True)
    df = pd.DataFrame({"path": paths.to_numpy(),
                       "patient_id": paths.str.extract(r"(patient\d+)")[0].fillna(paths).to_numpy(),
                       "split": split})
    fill = {"zero": 0.0, "one": 1.0, "nan": np.nan}[uncertain]
    for f in F.CHEXPERT5:
        v = pd.to_numeric(raw[f], errors="coerce").to_numpy(dtype=np.float64)
        v = np.where(np.isnan(v), 0.0, v)  # blank = not mentioned = negative (as the paper)
        df[f] = np.where(v == -1, fill, v)
    return df


@register_task("chexpert")
def load_chexpert(root: Path, seed: int = 0, image_root: str | None = None, uncertain: str = "zero") -> TaskData:
    """CheXpert (v1.0 or -small): 5 competition findings, frontal images, blanks -> 0, uncertain -> U-Zeros."""
    train, valid = root / "train.csv", root / "valid.csv"
    if not train.is_file() or not valid.is_file():
        raise ManifestError(root, "CheXpert root needs train.csv and valid.csv")
    test = _first(root, ["test_labels.csv", "test.csv", "test/test_labels.csv"])
    parts = [_chexpert_frame(train, root, "train", uncertain)]
    if test is not None:
        parts += [_chexpert_frame(valid, root, "val", uncertain), _chexpert_frame(test, root, "test", uncertain)]
        note = "official train / valid (val) / test"
    else:
        parts.append(_chexpert_frame(valid, root, "test", uncertain))
        note = f"no test labels: valid.csv is the test set, val = 5% of train patients (seed {seed})"
    df = pd.concat(parts, ignore_index=True)
    if test is None:
        df = _carve_val(df, 0.05, seed)
    names = list(F.CHEXPERT5)
    td = TaskData("chexpert", _make(df, Path(image_root) if image_root else root, names, train), names,
                  sources=[p for p in (train, valid, test) if p is not None])
    td.notes += [note, f"uncertain labels -> {uncertain}; blanks -> 0"]
    return td


# --- CXR-LT 2024 ------------------------------------------------------------------------------------------

def _patient_from_mimic_path(paths: pd.Series) -> pd.Series:
    return paths.astype(str).str.extract(r"(p\d{8})")[0]


@register_task("cxrlt24")
def load_cxrlt24(root: Path, seed: int = 0, image_root: str | None = None) -> TaskData:
    """CXR-LT 2024 with the 40 findings in logit order: root/{train,val,test}.csv (CheXFound's split of the
    official sets: train+val = official training set 80/20, test = official development set).
    A release with only train.csv and test.csv gets val = 20 % of train patients."""
    names = list(F.CXRLT24)
    files = {s: _first(root, [f"{s}.csv", f"{s}_labeled.csv"]) for s in ("train", "val", "test")}
    if files["train"] is None or files["test"] is None:
        raise ManifestError(root, "CXR-LT 2024 root needs train.csv and test.csv (and optionally val.csv)")
    parts = []
    for s, f in files.items():
        if f is None:
            continue
        raw = pd.read_csv(f)
        missing = [n for n in names if n not in raw.columns]
        if missing:
            raise ManifestError(f, f"missing CXR-LT finding column(s) {missing}")
        path_col = next((c for c in ("fpath", "path", "Path") if c in raw.columns), None)
        if path_col is None:
            raise ManifestError(f, "no fpath/path column")
        df = pd.DataFrame({"path": raw[path_col].astype(str), "split": s})
        if "subject_id" in raw.columns:
            df["patient_id"] = raw["subject_id"].astype(str)
        else:
            pid = _patient_from_mimic_path(raw[path_col])
            if pid.isna().any():
                raise ManifestError(f, "no subject_id column and patient ids cannot be parsed from paths")
            df["patient_id"] = pid
        for c in ("dicom_id", "study_id"):
            if c in raw.columns:
                df[c] = raw[c].astype(str)
        if "dicom_id" in df.columns:
            df["image_id"] = df["dicom_id"]
        for n in names:
            df[n] = pd.to_numeric(raw[n], errors="coerce").to_numpy(dtype=np.float64)
        parts.append(df)
    df = pd.concat(parts, ignore_index=True)
    notes = ["splits from the task files"]
    if files["val"] is None:
        df = _carve_val(df, 0.2, seed)
        notes = [f"val = 20% of train patients (seed {seed})"]
    td = TaskData("cxrlt24", _make(df, Path(image_root) if image_root else root, names, files["train"]), names,
                  sources=[p for p in files.values() if p is not None])
    td.notes += notes
    return td


# --- MIMIC-CXR-JPG ----------------------------------------------------------------------------------------

@register_task("mimic")
def load_mimic(root: Path, seed: int = 0, image_root: str | None = None, uncertain: str = "nan") -> TaskData:
    """MIMIC-CXR-JPG 2.x: CheXpert-labeller labels per study, frontal (PA/AP) images, official split.
    Blank = not mentioned = 0; uncertain (-1) -> `uncertain` (default: ignored)."""
    lab = _first(root, ["mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.1.0-chexpert.csv"])
    spl = _first(root, ["mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.1.0-split.csv"])
    meta = _first(root, ["mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.1.0-metadata.csv"])
    if lab is None or spl is None:
        raise ManifestError(root, "MIMIC-CXR-JPG root needs mimic-cxr-2.0.0-chexpert.csv(.gz) and -split.csv(.gz)")
    labels, split = pd.read_csv(lab), pd.read_csv(spl)
    names = list(F.CHEXPERT14)
    missing = [n for n in names if n not in labels.columns]
    if missing:
        raise ManifestError(lab, f"missing label column(s) {missing}")
    df = split.merge(labels, on=["subject_id", "study_id"], how="inner")
    if meta is not None:
        md = pd.read_csv(meta)
        df = df.merge(md[["dicom_id", "ViewPosition"]], on="dicom_id", how="left")
        df = df[df["ViewPosition"].isin(["PA", "AP"])]
    sid, st = df["subject_id"].astype(str), df["study_id"].astype(str)
    out = pd.DataFrame({
        "path": ("files/p" + sid.str[:2] + "/p" + sid + "/s" + st + "/" + df["dicom_id"].astype(str) + ".jpg").to_numpy(),
        "image_id": df["dicom_id"].astype(str).to_numpy(), "patient_id": sid.to_numpy(), "study_id": st.to_numpy(),
        "split": df["split"].astype(str).replace({"validate": "val"}).to_numpy()})
    fill = {"zero": 0.0, "one": 1.0, "nan": np.nan}[uncertain]
    for n in names:
        v = pd.to_numeric(df[n], errors="coerce").fillna(0.0).to_numpy(dtype=np.float64)
        out[n] = np.where(v == -1, fill, v)
    td = TaskData("mimic", _make(out, Path(image_root) if image_root else root, names, lab), names,
                  sources=[p for p in (lab, spl, meta) if p is not None])
    td.notes += ["official split", f"uncertain -> {uncertain}; blanks -> 0",
                 "frontal only" if meta is not None else "no metadata file: all views kept"]
    return td


# --- VinDr-CXR --------------------------------------------------------------------------------------------

@register_task("vindr")
def load_vindr(root: Path, seed: int = 0, image_root: str | None = None, val_frac: float = 0.1) -> TaskData:
    """VinDr-CXR 1.0: image-level labels; training images were read by 3 radiologists, whose labels are
    merged by majority vote (test labels are already a consensus). No patient ids are released, so each
    image is its own patient (bootstrap CIs are image-level here). Boxes from annotations_{train,test}.csv."""
    ann = root / "annotations" if (root / "annotations").is_dir() else root
    tr, te = ann / "image_labels_train.csv", ann / "image_labels_test.csv"
    if not tr.is_file() or not te.is_file():
        raise ManifestError(root, "VinDr-CXR root needs annotations/image_labels_{train,test}.csv")
    a, b = pd.read_csv(tr), pd.read_csv(te)
    names = [c for c in b.columns if c not in ("image_id", "rad_id", "rad_ID")]
    miss = [n for n in names if n not in a.columns]
    if miss:
        raise ManifestError(tr, f"training labels lack column(s) {miss} present in the test file")
    vote = a.groupby("image_id")[names].mean()
    train = (vote > 0.5).astype(np.float64).reset_index()
    train["split"] = "train"
    test = b[["image_id"] + names].copy()
    test["split"] = "test"
    df = pd.concat([train, test], ignore_index=True)
    df["patient_id"] = df["image_id"].astype(str)
    df["path"] = [f"{s}/{i}.dicom" for s, i in zip(df["split"], df["image_id"])]
    df = _carve_val(df, val_frac, seed)
    td = TaskData("vindr", _make(df, Path(image_root) if image_root else root, names, tr), names,
                  sources=[tr, te])
    td.notes += ["training labels: majority of 3 readers", "no patient ids: one image = one patient",
                 f"val = {val_frac:.0%} of train images (seed {seed})"]
    boxes = [p for p in (ann / "annotations_train.csv", ann / "annotations_test.csv") if p.is_file()]
    if boxes:
        td.boxes = pd.concat([read_boxes(p) for p in boxes], ignore_index=True)
        td.sources += boxes
    return td
