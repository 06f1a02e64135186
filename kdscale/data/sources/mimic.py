"""MIMIC source: MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR reports + MIMIC-IV EHR as extracted by the
mimic3-benchmarks/MedFuse pipeline (formats: ../shared/docs/method-and-data.md section 3)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdscale.config import path_field


@dataclass
class MimicConfig:
    cxr_root: str = path_field()          # holds mimic-cxr-2.0.0-{metadata,chexpert,split}.csv and files/
    ehr_root: str = path_field("")        # mimic4extract data dir: root/all_stays.csv, <task>/{train,test}/, listfiles
    reports_root: str = path_field("")    # MIMIC-CXR reports: files/pXX/p<subject>/s<study>.txt ("" = no reports)
    resized_image_dir: str = path_field("")  # flat folder <dicom_id>.jpg (MedFuse resize.py); "" = files/ layout
    task: Literal["in-hospital-mortality", "phenotyping", "radiology"] = "in-hospital-mortality"
    cohort: Literal["paired", "partial"] = "partial"  # paired: stays with an image; partial: every stay
    ihm_window_hours: float = 48.0        # MedFuse's 2023-03-02 rule; null-like 0 = whole stay (pre-2023)
    view_positions: list[str] = field(default_factory=lambda: ["AP"])
    discretizer: str = path_field("configs/ehr/mimic4_17ch.yaml")
    timestep_hours: float = 1.0
    max_hours: float = 0.0                # cap the EHR series length (0 = no cap)
    uncertain_label: Literal["zeros", "ones"] = "zeros"  # CheXpert -1 -> 0 (U-Zeros, MedFuse) or 1
    include_reports: bool = True
    val_from_train: bool = True           # validation subjects come from <task>/val_listfile.csv
