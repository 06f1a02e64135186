"""The ``data.cbis`` section of a config: :class:`CbisConfig`, validated at load. The reader it
configures is ``kdscale.data.sources.cbis``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdscale.config import path_field


CSV_KINDS = ("mass_train", "mass_test", "calc_train", "calc_test")


@dataclass
class CbisConfig:
    root: str = path_field()              # folder holding the case-description CSVs and the image tree
    abnormality: Literal["mass", "calc", "both"] = "both"   # which case-description files to read
    csv_files: dict[str, str] = field(default_factory=lambda: {   # relative to root; keys: CSV_KINDS
        "mass_train": "mass_case_description_train_set.csv",
        "mass_test": "mass_case_description_test_set.csv",
        "calc_train": "calc_case_description_train_set.csv",
        "calc_test": "calc_case_description_test_set.csv",
    })
    image_dir: str = ""                   # folder (relative to root) the CSVs' file paths start from ("" = root)
    converted_suffixes: list[str] = field(default_factory=lambda: [".png", ".jpg", ".jpeg"])  # tried for .dcm paths
    dicom_info_csv: str = ""              # Kaggle JPEG re-packaging: csv/dicom_info.csv (under root) maps paths to JPEGs
    dicom_info_prefix: str = "CBIS-DDSM/"  # leading part of dicom_info's image_path to drop before joining root
    mask_threshold: int = 127             # ROI pixels above this are lesion (Kaggle masks are lossy JPEGs, not 0/255)
    val_fraction: float = 0.1             # validation patients drawn (deterministically) from the train CSVs
    split_seed: int = 0
    include_assessment: bool = False      # BI-RADS assessment nearly is the label: leakage, off by default
    patient_overlap: Literal["skip_train", "error"] = "skip_train"  # a patient in train AND test CSVs (mass vs calc):
    # skip_train = the patient's train images become counted skips (the official test set stays intact); error = stop

    def __post_init__(self) -> None:
        unknown = sorted(set(self.csv_files) - set(CSV_KINDS))
        if unknown:
            raise ValueError(f"cbis.csv_files has unknown key(s) {unknown}; valid: {list(CSV_KINDS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"cbis.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.mask_threshold < 255:
            raise ValueError(f"cbis.mask_threshold must be in [0, 255), got {self.mask_threshold}")
