"""CBIS-DDSM source: TCIA case-description CSVs, full mammograms, ROI masks -> boxes; the case
metadata is the tabular (privileged) modality; pathology is the label (section 4.1)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdscale.config import path_field


@dataclass
class CbisConfig:
    root: str = path_field()              # folder holding the case-description CSVs and the image tree
    abnormality: Literal["mass", "calc", "both"] = "both"
    csv_files: dict[str, str] = field(default_factory=lambda: {
        "mass_train": "mass_case_description_train_set.csv",
        "mass_test": "mass_case_description_test_set.csv",
        "calc_train": "calc_case_description_train_set.csv",
        "calc_test": "calc_case_description_test_set.csv",
    })
    dicom_info_csv: str = ""              # Kaggle JPEG re-packaging: csv/dicom_info.csv maps DICOM paths to JPEGs
    val_fraction: float = 0.1             # validation patients drawn (deterministically) from the train CSVs
    split_seed: int = 0
    include_assessment: bool = False      # BI-RADS assessment nearly is the label: leakage, off by default
