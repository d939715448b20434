"""Dataset readers on small fixture files written in each dataset's real column format, and on the
shared NIH / Kermany folders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chexfound.data import findings as F
from chexfound.data.readers import (
    KERMANY_PATIENT_REGEX,
    read_chexpert,
    read_cxrlt24,
    read_folder,
    read_kermany,
    read_mimic,
    read_nih14,
    read_nih14_boxes,
    read_nih14_shared,
    read_padchest,
    read_vindr,
)
from chexfound.errors import ManifestError


def _touch(root: Path, rel: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\x89PNG placeholder")  # readers only check existence


# --- NIH ChestX-ray14 (official release) --------------------------------------------------------------
NIH_V2020 = """Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]
00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143
00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143
00000003_000.png,Hernia,0,3,81,F,PA,2582,2991,0.143,0.143
00000005_000.png,No Finding,0,5,69,F,PA,2048,2500,0.168,0.168
00000013_005.png,Emphysema|Infiltration|Pleural_Thickening|Pneumothorax,5,13,60,M,AP,3056,2544,0.139,0.139
00000030_001.png,Atelectasis|Effusion,1,30,79,M,PA,2992,2991,0.143,0.143
"""
# The original 2017 file: ages like "058Y" and a trailing comma on every line.
NIH_2017 = """Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],
00000001_000.png,Cardiomegaly,0,1,058Y,M,PA,2682,2749,0.143,0.143,
00000005_000.png,No Finding,0,5,069Y,F,PA,2048,2500,0.168,0.168,
00000030_001.png,Atelectasis|Effusion,1,30,079Y,M,PA,2992,2991,0.143,0.143,
"""
NIH_BBOX = """Image Index,Finding Label,Bbox [x,y,w,h],,,
00000013_005.png,Infiltrate,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,
00000030_001.png,Atelectasis,686.101694915254,131.525423728813,185.491525423729,313.491525423729,,,
"""


@pytest.fixture()
def nih_root(tmp_path: Path) -> Path:
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text(NIH_V2020)
    (tmp_path / "BBox_List_2017.csv").write_text(NIH_BBOX)
    (tmp_path / "test_list.txt").write_text("00000003_000.png\n00000030_001.png\n")
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000005_000.png\n")
    for i, name in enumerate(n.split(",")[0] for n in NIH_V2020.splitlines()[1:]):
        _touch(tmp_path, f"images_00{1 + i // 3}/images/{name}")  # spread over the tarball folders
    return tmp_path


def test_nih14_official(nih_root: Path) -> None:
    m = read_nih14(nih_root)
    assert len(m) == 6 and m.label_columns == list(F.NIH14)
    row = m.df.set_index("image_id").loc["00000013_005.png"]
    assert row["Pleural_Thickening"] == 1 and row["Infiltration"] == 1 and row["Effusion"] == 0
    assert row["patient_id"] == "13" and row["view"] == "AP" and row["age"] == 60
    assert m.df.set_index("image_id").loc["00000005_000.png", list(F.NIH14)].sum() == 0  # No Finding
    assert dict(zip(m.df["image_id"], m.df["split"]))["00000030_001.png"] == "test"
    assert all(p.is_file() for p in m.paths())
    assert m.df["path"].str.startswith("images_00").all()


def test_nih14_original_2017_file(tmp_path: Path) -> None:
    (tmp_path / "Data_Entry_2017.csv").write_text(NIH_2017)
    for n in ("00000001_000.png", "00000005_000.png", "00000030_001.png"):
        _touch(tmp_path, f"images/{n}")
    m = read_nih14(tmp_path)
    assert list(m.df["age"]) == [58, 69, 79] and "split" not in m.df.columns
    assert m.labels()[2, F.NIH14.index("Effusion")] == 1


def test_nih14_missing_images_dropped_or_error(nih_root: Path) -> None:
    next(nih_root.glob("images_001/images/00000001_000.png")).unlink()
    assert len(read_nih14(nih_root)) == 5
    with pytest.raises(ManifestError, match="1 of 6 images do not exist"):
        read_nih14(nih_root, missing="error")
    assert len(read_nih14(nih_root, missing="keep")) == 6


def test_nih14_unknown_finding_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "Data_Entry_2017.csv").write_text(NIH_2017.replace("Atelectasis|Effusion", "Atelectasis|Efusion"))
    for n in ("00000001_000.png", "00000005_000.png", "00000030_001.png"):
        _touch(tmp_path, f"images/{n}")
    with pytest.raises(ManifestError, match="Efusion"):
        read_nih14(tmp_path)


def test_nih14_boxes_official_and_shared(nih_root: Path, data_root: Path) -> None:
    b = read_nih14_boxes(nih_root / "BBox_List_2017.csv")
    assert list(b.columns) == ["image_id", "finding", "x", "y", "w", "h"]
    assert list(b["finding"]) == ["Infiltration", "Atelectasis"]
    assert b["w"].iloc[0] == pytest.approx(86.78, abs=0.01)
    shared = read_nih14_boxes(data_root / "nih14" / "boxes.csv")
    assert len(shared) == 614 and set(shared["finding"]) <= set(F.NIH14)


def test_nih14_shared_layout(data_root: Path) -> None:
    m = read_nih14_shared(data_root / "nih14")
    assert len(m) == 550 and m.label_columns == list(F.NIH14)
    assert all(p.is_file() for p in m.paths()[:20])
    full = read_nih14_shared(data_root / "nih14-fullres")
    assert "no_finding" not in full.label_columns and len(full) == 21


# --- CheXpert -------------------------------------------------------------------------------------------
CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                   "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
                   "Pleural Effusion,Pleural Other,Fracture,Support Devices")
CHEXPERT_TRAIN = CHEXPERT_HEADER + """
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0
CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,
CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Female,83,Frontal,AP,,,,1.0,,,-1.0,,,,,,1.0,
CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,,,,,,,1.0,
"""
CHEXPERT_VALID = CHEXPERT_HEADER + """
CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
"""


@pytest.fixture()
def chexpert_root(tmp_path: Path) -> Path:
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    (root / "train.csv").write_text(CHEXPERT_TRAIN)
    (root / "valid.csv").write_text(CHEXPERT_VALID)
    for line in (CHEXPERT_TRAIN + CHEXPERT_VALID).splitlines():
        if line.startswith("CheXpert"):
            _touch(tmp_path, line.split(",")[0])
    return root


def test_chexpert(chexpert_root: Path) -> None:
    m = read_chexpert(chexpert_root)
    assert len(m) == 5 and m.label_columns == list(F.CHEXPERT14)
    assert all(p.is_file() for p in m.paths())
    assert list(m.df["patient_id"]) == ["patient00001", "patient00002", "patient00002", "patient00002",
                                        "patient64541"]
    assert list(m.df["split"]) == ["train"] * 4 + ["val"]
    assert m.df["view"].tolist()[:4] == ["AP", "AP", "AP", "LATERAL"]
    y = m.labels()  # blank -> NaN, -1 -> NaN under the default policy
    c = F.CHEXPERT14.index
    assert y[0, c("No Finding")] == 1 and np.isnan(y[0, c("Cardiomegaly")]) and y[0, c("Pneumothorax")] == 0
    assert np.isnan(y[1, c("Cardiomegaly")])
    assert m.labels("one")[1, c("Cardiomegaly")] == 1 and m.labels("zero")[1, c("Cardiomegaly")] == 0
    mixed = m.labels({"Atelectasis": "one", "Cardiomegaly": "zero"})  # CheXpert paper's U-Ones/U-Zeros
    assert mixed[1, c("Atelectasis")] == 1 and mixed[1, c("Cardiomegaly")] == 0 and np.isnan(mixed[1, c("Edema")])
    assert len(read_chexpert(chexpert_root, frontal_only=True)) == 4


def test_chexpert_missing_column(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(CHEXPERT_TRAIN.replace("Pleural Other", "Pleural Othr"))
    with pytest.raises(ManifestError, match="Pleural Other"):
        read_chexpert(tmp_path)


# --- MIMIC-CXR-JPG ----------------------------------------------------------------------------------------
MIMIC_META = """dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning
02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect
174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect
2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,CHEST (PA AND LAT),PA,3056,2544,21800626,165500.312,CHEST (PA AND LAT),postero-anterior,Erect
68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714,10000764,57375967,CHEST (PORTABLE AP),AP,2705,2539,21321015,112214.859,CHEST (PORTABLE AP),antero-posterior,
"""
MIMIC_SPLIT = """dicom_id,study_id,subject_id,split
02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,50414267,10000032,train
174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,50414267,10000032,train
2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,53189527,10000032,train
68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714,57375967,10000764,validate
"""
MIMIC_CHEXPERT = """subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices
10000032,50414267,,,,,,,,,1.0,,,,,
10000032,53189527,,,,,,,,,1.0,,,,,
10000764,57375967,,,1.0,,,,,,,,,-1.0,,
"""


def test_mimic(tmp_path: Path) -> None:
    for name, text in (("metadata", MIMIC_META), ("split", MIMIC_SPLIT), ("chexpert", MIMIC_CHEXPERT)):
        (tmp_path / f"mimic-cxr-2.0.0-{name}.csv.gz").write_bytes(gzip.compress(text.encode()))
    for line in MIMIC_META.splitlines()[1:]:
        d, s, st = line.split(",")[:3]
        _touch(tmp_path, f"files/p{s[:2]}/p{s}/s{st}/{d}.jpg")
    m = read_mimic(tmp_path)
    assert len(m) == 4 and m.label_columns == list(F.CHEXPERT14)
    assert m.df["path"].iloc[0] == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    assert list(m.df["split"]) == ["train", "train", "train", "val"]
    assert list(m.df["view"]) == ["PA", "LATERAL", "PA", "AP"]
    assert m.df["patient_id"].tolist() == ["10000032"] * 3 + ["10000764"]
    c = F.CHEXPERT14.index
    y = m.labels()
    assert y[0, c("No Finding")] == 1 and y[1, c("No Finding")] == 1  # study labels on every image
    assert y[3, c("Consolidation")] == 1 and np.isnan(y[3, c("Pneumonia")])
    assert m.labels("one")[3, c("Pneumonia")] == 1


# --- CXR-LT 2024 -----------------------------------------------------------------------------------------
def _cxrlt_csv(rows: list[tuple[str, str, str, str, list[str]]]) -> str:
    head = "dicom_id,subject_id,study_id,ViewPosition,fpath," + ",".join(
        f'"{c}"' if "," in c else c for c in F.CXRLT24)
    lines = [head]
    for dicom, subject, study, view, pos in rows:
        fpath = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
        lines.append(",".join([dicom, subject, study, view, fpath] + ["1" if c in pos else "0" for c in F.CXRLT24]))
    return "\n".join(lines) + "\n"


def test_cxrlt24(tmp_path: Path) -> None:
    train = [("aaa", "10000032", "50414267", "PA", ["Normal"]),
             ("bbb", "10000764", "57375967", "AP", ["Round(ed) Atelectasis", "Pleural Effusion"])]
    dev = [("ccc", "19999987", "58971208", "AP", ["Support Devices"])]
    (tmp_path / "train_labeled.csv").write_text(_cxrlt_csv(train))
    (tmp_path / "development_labeled_task1.csv").write_text(_cxrlt_csv(dev))
    mimic = tmp_path / "mimic-cxr-jpg"
    for d, s, st, _, _ in train + dev:
        _touch(mimic, f"files/p{s[:2]}/p{s}/s{st}/{d}.jpg")
    m = read_cxrlt24(tmp_path, image_root=mimic)
    assert m.label_columns == list(F.CXRLT24) and len(m) == 3
    assert list(m.df["split"]) == ["train", "train", "val"]
    y = m.labels()
    assert y[1, F.CXRLT24.index("Round(ed) Atelectasis")] == 1 and y[1].sum() == 2
    assert all(p.is_file() for p in m.paths())
    (tmp_path / "train_labeled.csv").write_text(_cxrlt_csv(train).replace("Tuberculosis", "TB"))
    with pytest.raises(ManifestError, match="Tuberculosis"):
        read_cxrlt24(tmp_path, image_root=mimic)


# --- VinDr-CXR ---------------------------------------------------------------------------------------------
def test_vindr(tmp_path: Path) -> None:
    cols = list(F.VINDR_CXR)
    train = pd.DataFrame(0, index=range(6), columns=cols)
    train.insert(0, "rad_id", ["R8", "R9", "R10", "R1", "R2", "R3"])
    train.insert(0, "image_id", ["000434271f63a053c4128a0ba6352c7f"] * 3 + ["00053190460d56c53cc3e57321387478"] * 3)
    train.loc[0, "Cardiomegaly"] = 1  # one reader of three: "any" yes, "majority" no
    train.loc[[3, 4], "Pleural effusion"] = 1  # two of three
    train.loc[[0, 1, 2], "No finding"] = [0, 1, 1]
    test = pd.DataFrame(0, index=range(1), columns=[c if c != "Other diseases" else "Other disease" for c in cols])
    test.insert(0, "image_id", ["002a34c58c5b758217ed1f584ccbcfe9"])
    test.loc[0, "Lung tumor"] = 1
    ann = tmp_path / "annotations"
    ann.mkdir()
    train.to_csv(ann / "image_labels_train.csv", index=False)
    test.to_csv(ann / "image_labels_test.csv", index=False)
    for i in set(train["image_id"]):
        _touch(tmp_path, f"train/{i}.dicom")
    _touch(tmp_path, "test/002a34c58c5b758217ed1f584ccbcfe9.dicom")
    m = read_vindr(tmp_path)
    assert len(m) == 3 and m.label_columns == cols and list(m.df["split"]) == ["train", "train", "test"]
    y = m.labels()
    c = cols.index
    assert y[0, c("Cardiomegaly")] == 0 and y[0, c("No finding")] == 1 and y[1, c("Pleural effusion")] == 1
    assert y[2, c("Lung tumor")] == 1 and list(m.df["rad_count"]) == [3, 3, 1]
    assert read_vindr(tmp_path, vote="any").labels()[0, c("Cardiomegaly")] == 1


# --- PadChest ----------------------------------------------------------------------------------------------
PADCHEST = """,ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,ViewPosition_DICOM,Projection,MethodProjection,Pediatric,Modality_DICOM,Manufacturer_DICOM,PhotometricInterpretation_DICOM,PixelRepresentation_DICOM,PixelAspectRatio_DICOM,SpatialResolution_DICOM,BitsStored_DICOM,WindowCenter_DICOM,WindowWidth_DICOM,Rows_DICOM,Columns_DICOM,XRayTubeCurrent_DICOM,Exposure_DICOM,ExposureTime_DICOM,RelativeXRayExposure_DICOM,ReportID,Report,MethodLabel,Labels,Localizations,LabelsLocalizationsBySentence,labelCUIS,LocalizationsCUIS
0,20536686640136348236148679891455886468_k6ga29.png,0,20140915,20536686640136348236148679891455886468,839860488694292331637988235681460987,1930.0,F,POSTEROANTERIOR,PA,Manual review of DICOM fields,No,CR,PhilipsMedicalSystems,MONOCHROME2,0,,0.139,12,2047,4095,2888,2832,,,,,4765777,sin hallazgo,Physician,['normal'],[],"[['normal']]",[],[]
1,135803415504923515076821959678074435083_fzis7d.png,0,20150707,135803415504923515076821959678074435083,313572750430997347502932654319389875966,1929.0,M,POSTEROANTERIOR,PA,Manual review of DICOM fields,No,CR,PhilipsMedicalSystems,MONOCHROME2,0,,0.139,12,2047,4095,2880,2872,,,,,4991845,cardiomegalia,RNN_model,"['pleural effusion', ' cardiomegaly', 'costophrenic angle blunting']",[],[],[],[]
2,113855343774216031107737439268449233401_wa9k4b.png,0,20150707,135803415504923515076821959678074435083,313572750430997347502932654319389875966,1929.0,M,LATERAL,L,Manual review of DICOM fields,No,CR,PhilipsMedicalSystems,MONOCHROME2,0,,0.139,12,2047,4095,2880,2872,,,,,4991845,cardiomegalia,RNN_model,"['cardiomegaly']",[],[],[],[]
3,6622323046829215651306337883047066405_xu4fb3.png,1,20150708,662232304,7788,1940.0,M,POSTEROANTERIOR,PA,Manual review of DICOM fields,No,CR,PhilipsMedicalSystems,MONOCHROME2,0,,0.139,12,2047,4095,2880,2872,,,,,4991846,,Physician,,[],[],[],[]
"""


def test_padchest(tmp_path: Path) -> None:
    (tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv").write_text(PADCHEST)
    df = pd.read_csv(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv")
    for d, i in zip(df["ImageDir"], df["ImageID"]):
        _touch(tmp_path, f"{d}/{i}")
    m = read_padchest(tmp_path)
    assert m.label_columns == ["cardiomegaly", "costophrenic angle blunting", "normal", "pleural effusion"]
    y = m.labels()
    assert y[0].tolist() == [0, 0, 1, 0] and y[1].tolist() == [1, 1, 0, 1] and np.isnan(y[3]).all()
    assert m.df["patient_id"].iloc[1] == m.df["patient_id"].iloc[2] and list(m.df["view"][:3]) == ["PA", "PA", "L"]
    assert all(p.is_file() for p in m.paths())
    assert read_padchest(tmp_path, min_count=2).label_columns == ["cardiomegaly"]
    assert F.finding_map(m.label_columns, F.CXRLT24) == {"cardiomegaly": "Cardiomegaly", "normal": "Normal",
                                                          "pleural effusion": "Pleural Effusion"}


# --- class folders and the shared sets --------------------------------------------------------------------
def test_kermany_shared_and_folder_agree(data_root: Path) -> None:
    shared = read_kermany(data_root / "kermany")
    assert len(shared) == 5840 and shared.label_columns == ["PNEUMONIA"]
    assert shared.df.groupby("split").size().to_dict() == {"test": 624, "train": 5216}
    folder = read_folder(data_root / "kermany" / "dataset", patient_regex=KERMANY_PATIENT_REGEX)
    assert folder.label_columns == ["NORMAL", "PNEUMONIA"] and len(folder) == 5840
    a = dict(zip(shared.paths(), shared.labels()[:, 0]))
    b = dict(zip(folder.paths(), folder.labels()[:, 1]))
    assert a == b  # the same images with the same labels
    assert folder.df["patient_id"].str.match(KERMANY_PATIENT_REGEX).all()
    assert folder.df["patient_id"].nunique() < len(folder)  # patients have several images


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no images"):
        read_folder(tmp_path)
    _touch(tmp_path, "A/x1.png")
    with pytest.raises(ManifestError, match="does not match"):
        read_folder(tmp_path, patient_regex=r"^patient(\d+)")


def test_nih14_tiny64_split_names_and_leak_warning(data_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        m = read_nih14_shared(data_root / "nih14-tiny64")
    assert set(m.df["split"]) == {"train", "val", "test"}
    assert "appear in several of the given splits" in caplog.text
    resplit = m.with_patient_split(seed=0)
    assert (resplit.df.groupby("patient_id")["split"].nunique() == 1).all()
