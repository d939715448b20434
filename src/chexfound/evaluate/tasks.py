"""Ready-made evaluation tasks: public CXR datasets as (manifest with train/val/test split, findings).

Reading each dataset's files is the job of `chexfound.data.readers`; a task adds the evaluation policy on
top: which findings are scored, how blank/uncertain labels are resolved, which views are kept, and the
train / val / test split. Every loader returns a `TaskData` whose manifest has a `split` column
(patient-disjoint where the dataset has patient ids) and one label column per task finding. Official splits
are used where the dataset has them; otherwise a seeded patient-level split is made and recorded.

| task     | findings                                | splits                                                    |
|----------|-----------------------------------------|-----------------------------------------------------------|
| nih14    | 14 NIH findings (NIH spelling)          | official train_val/test lists, val = 10 % of train_val patients; shared subset: 70/10/20 by patient |
| chexpert | 5 competition findings, U-Zeros, frontal| train.csv / valid.csv (val) / test labels (test); without a test file valid is the test set and val is 5 % of train patients |
| cxrlt24  | the 40 CXR-LT 2024 findings (logit order)| {train,val,test}.csv as the CheXFound authors split them   |
| mimic    | 14 CheXpert labeller findings, frontal  | official mimic-cxr-2.0.0-split                            |
| vindr    | 28 VinDr-CXR image-level labels         | official train / test, val = 10 % of train images         |
| kermany  | PNEUMONIA (binary)                      | official train / test, val = 10 % of train patients       |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from chexfound.data import findings as F
from chexfound.data import readers as R
from chexfound.data.manifest import Manifest, patient_split
from chexfound.data.uncertain import resolve_uncertain
from chexfound.errors import ManifestError
from chexfound.evaluate.box_scores import read_boxes
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
    import inspect

    loader = TASKS[key]
    if kw.get("image_root") is None:
        kw.pop("image_root", None)
    elif "image_root" not in inspect.signature(loader).parameters:
        raise ManifestError(None, f"task {key!r} reads images under its root; --image-root does not apply")
    td = loader(r, seed=seed, **kw)
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


# --- policies shared by several tasks ---------------------------------------------------------------------

def _resolve(df: pd.DataFrame, names: Sequence[str], blank: float, uncertain: str) -> None:
    """In place: blank (NaN) -> `blank`, -1 -> the uncertain policy ("zero", "one" or "nan" = ignore)."""
    for n in names:
        v = pd.to_numeric(df[n], errors="coerce").to_numpy(dtype=np.float64)
        df[n] = resolve_uncertain(np.where(np.isnan(v), blank, v), uncertain)


def _task(name: str, m: Manifest, findings: Sequence[str], kind: str = "multilabel",
          notes: Sequence[str] = ()) -> TaskData:
    m.label_columns = list(findings)
    srcs = [m.source] if m.source is not None else []
    return TaskData(name, m, list(findings), kind=kind, sources=srcs, notes=list(notes))


def _drop_rare(td: TaskData, min_total_pos: int) -> TaskData:
    y = td.manifest.labels()
    keep = [f for c, f in enumerate(td.findings) if np.nansum(y[:, c] == 1) >= min_total_pos]
    dropped = [f for f in td.findings if f not in keep]
    if dropped:
        td.notes.append(f"left out {dropped}: fewer than {min_total_pos} positive images in the whole set")
        td.findings = keep
        td.manifest.label_columns = keep
    return td


def _keep_splits(m: Manifest) -> Manifest:
    """Drop rows without a split (e.g. images missing from an official split file)."""
    ok = m.df["split"].notna().to_numpy() & m.df["split"].isin(["train", "val", "test"]).to_numpy()
    return m if ok.all() else m.subset(ok)


# --- NIH ChestX-ray14 -------------------------------------------------------------------------------------

@register_task("nih14")
def load_nih14(root: Path, seed: int = 0, image_root: str | None = None, min_total_pos: int = 5) -> TaskData:
    """NIH ChestX-ray14: the official release or the shared subset layout (labels.csv [+ boxes.csv]).
    Boxes (BBox_List_2017.csv / boxes.csv) come with it for the localisation protocol."""
    if (root / "labels.csv").is_file() and not any(root.glob("Data_Entry_2017*")):
        m = R.read_nih14_shared(root)
        if "split" not in m.df.columns:
            m.df["split"] = patient_split(m.patients(), (0.7, 0.1, 0.2), seed=seed)
            note = f"patient-level 70/10/20 split, seed {seed} (subset without official split)"
        else:
            note = "splits from labels.csv"
        td = _drop_rare(_task("nih14", m, F.NIH14, notes=[note]), min_total_pos)
    else:
        m = R.read_nih14(root, image_root=image_root)
        if "split" not in m.df.columns:
            raise ManifestError(root, "official NIH test_list.txt not found")
        m.df = _carve_val(m.df, 0.1, seed)
        td = _task("nih14", m, F.NIH14, notes=[f"official test list; val = 10% of train_val patients (seed {seed})"])
    box_file = next((p for p in (root / "BBox_List_2017.csv", root / "boxes.csv") if p.is_file()), None)
    if box_file is not None:
        td.boxes = R.read_nih14_boxes(box_file)
        td.sources.append(box_file)
    return td


# --- Kermany paediatric pneumonia ------------------------------------------------------------------------

@register_task("kermany")
def load_kermany(root: Path, seed: int = 0, val_frac: float = 0.1) -> TaskData:
    """Kermany et al. 2018 (shared labels.csv or the release's class folders). The tiny official val folder
    (16 images), if present, is merged into train; val = `val_frac` of the training patients."""
    m = R.read_kermany(root)
    if "split" not in m.df.columns:
        raise ManifestError(root, "Kermany data without train/test split folders or split column")
    m.df["split"] = m.df["split"].replace({"val": "train"})
    m.df = _carve_val(m.df, val_frac, seed)
    return _task("kermany", m, ["PNEUMONIA"], kind="binary",
                 notes=[f"official train/test; val = {val_frac:.0%} of train patients (seed {seed})"])


# --- CheXpert ---------------------------------------------------------------------------------------------

@register_task("chexpert")
def load_chexpert(root: Path, seed: int = 0, uncertain: str = "zero") -> TaskData:
    """CheXpert (v1.0 or -small): the 5 competition findings on frontal images; blanks -> 0 and uncertain ->
    U-Zeros by default (as the CheXFound code). train.csv / valid.csv (val) / test labels (test); without a
    test file, valid.csv is the test set and val is 5 % of the training patients."""
    m = R.read_chexpert(root, frontal_only=True)
    names = list(F.CHEXPERT5)
    _resolve(m.df, names, 0.0, uncertain)
    if (m.df["split"] == "test").any():
        note = "official train / valid (val) / test"
    else:
        m.df["split"] = m.df["split"].replace({"val": "test"})
        m.df = _carve_val(m.df, 0.05, seed)
        note = f"no test labels: valid.csv is the test set, val = 5% of train patients (seed {seed})"
    return _task("chexpert", m, names, notes=[note, f"frontal only; uncertain -> {uncertain}; blanks -> 0"])


# --- CXR-LT 2024 ------------------------------------------------------------------------------------------

@register_task("cxrlt24")
def load_cxrlt24(root: Path, seed: int = 0, image_root: str | None = None) -> TaskData:
    """CXR-LT 2024 task 1, the 40 findings in the released GLoRI's logit order, with the release's splits
    (train_labeled / development_labeled_task1 / test_labeled_task1) or the CheXFound authors' train/val/test.csv.
    Without a validation file, val = 20 % of the training patients (the authors' 80/20)."""
    m = _keep_splits(R.read_cxrlt24(root, image_root=image_root))
    notes = ["splits from the task files"]
    if not (m.df["split"] == "val").any():
        m.df = _carve_val(m.df, 0.2, seed)
        notes = [f"val = 20% of train patients (seed {seed})"]
    return _task("cxrlt24", m, F.CXRLT24, notes=notes)


# --- MIMIC-CXR-JPG ----------------------------------------------------------------------------------------

@register_task("mimic")
def load_mimic(root: Path, seed: int = 0, image_root: str | None = None, uncertain: str = "nan") -> TaskData:
    """MIMIC-CXR-JPG 2.x: the 14 CheXpert-labeller findings per study on frontal (PA/AP) images, official split.
    Blank (not mentioned) -> 0; uncertain (-1) -> `uncertain` (default: ignored)."""
    m = _keep_splits(R.read_mimic(root, image_root=image_root))
    names = list(F.MIMIC_CHEXPERT14)
    view = m.df["view"].astype(str).str.upper()
    frontal = view.isin(["PA", "AP"]).to_numpy()
    if frontal.any():
        m = m.subset(frontal)
    _resolve(m.df, names, 0.0, uncertain)
    return _task("mimic", m, names, notes=["official split", f"uncertain -> {uncertain}; blanks -> 0",
                                          "frontal (PA/AP) only" if frontal.any() else "no view info: all kept"])


# --- VinDr-CXR --------------------------------------------------------------------------------------------

@register_task("vindr")
def load_vindr(root: Path, seed: int = 0, val_frac: float = 0.1) -> TaskData:
    """VinDr-CXR 1.0: the 28 image-level labels (training labels: majority of the 3 readers; test labels are a
    consensus). No patient ids are released, so each image is its own patient. Boxes from
    annotations_{train,test}.csv."""
    m = R.read_vindr(root)
    m.df = _carve_val(m.df, val_frac, seed)
    td = _task("vindr", m, F.VINDR_CXR, notes=["training labels: majority of 3 readers",
                                               "no patient ids: one image = one patient",
                                               f"val = {val_frac:.0%} of train images (seed {seed})"])
    ann = root / "annotations" if (root / "annotations").is_dir() else root
    boxes = [p for p in (ann / "annotations_train.csv", ann / "annotations_test.csv") if p.is_file()]
    if boxes:
        b = pd.concat([read_boxes(p) for p in boxes], ignore_index=True)
        td.boxes = b[b["finding"].isin(td.findings)].reset_index(drop=True)
        td.sources += boxes
    return td
