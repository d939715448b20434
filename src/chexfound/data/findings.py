"""Canonical finding vocabularies (torchxrayvision-style: one list each, exact names and order)."""

from __future__ import annotations

# CXR-LT 2024, in the exact logit order of the released GLoRI head (indices 0-39).
CXRLT24: tuple[str, ...] = (
    "Adenopathy", "Atelectasis", "Azygos Lobe", "Calcification of the Aorta", "Cardiomegaly",
    "Clavicle Fracture", "Consolidation", "Edema", "Emphysema", "Enlarged Cardiomediastinum",
    "Fibrosis", "Fissure", "Fracture", "Granuloma", "Hernia",
    "Hydropneumothorax", "Infarction", "Infiltration", "Kyphosis", "Lobar Atelectasis",
    "Lung Lesion", "Lung Opacity", "Mass", "Nodule", "Normal",
    "Pleural Effusion", "Pleural Other", "Pleural Thickening", "Pneumomediastinum", "Pneumonia",
    "Pneumoperitoneum", "Pneumothorax", "Pulmonary Embolism", "Pulmonary Hypertension", "Rib Fracture",
    "Round(ed) Atelectasis", "Subcutaneous Emphysema", "Support Devices", "Tortuous Aorta", "Tuberculosis",
)

# NIH ChestX-ray14 (Wang et al. 2017), as named in Data_Entry_2017 (Pleural_Thickening spelled with a space).
NIH14: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural Thickening", "Hernia",
)

# CheXpert 14 observations (Irvin et al. 2019), train.csv column order.
CHEXPERT14: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)

# The 5 CheXpert competition findings.
CHEXPERT5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
