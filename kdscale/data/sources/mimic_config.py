"""The ``data.mimic`` section of a config: :class:`MimicConfig`, validated at load. The reader it
configures is ``kdscale.data.sources.mimic``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdscale.config import path_field
from kdscale.data.ehr import MEDFUSE_DISCRETIZER


EHR_TASKS = ("in-hospital-mortality", "phenotyping")


@dataclass
class MimicConfig:
    cxr_root: str = path_field()          # holds mimic-cxr-2.0.0-{metadata,chexpert,split}.csv and files/
    ehr_root: str = path_field("")        # mimic4extract data dir: root/all_stays.csv, <task>/{train,test}/, listfiles
    reports_root: str = path_field("")    # MIMIC-CXR reports: files/pXX/p<subject>/s<study>.txt ("" = no reports)
    resized_image_dir: str = path_field("")  # flat folder <dicom_id>.jpg (MedFuse resize.py); "" = files/ layout
    ms_cxr_csv: str = path_field("")      # MS-CXR_Local_Alignment_v1.1.0.csv: boxes attached to matching images
    task: Literal["in-hospital-mortality", "phenotyping", "radiology"] = "in-hospital-mortality"
    cohort: Literal["paired", "partial"] = "partial"  # paired: stays with an image; partial: every stay
    ihm_window_hours: float = 48.0        # MedFuse's 2023-03-02 rule; 0 = whole stay (pre-2023 pairing)
    view_positions: list[str] = field(default_factory=lambda: ["AP"])
    discretizer: str = path_field(MEDFUSE_DISCRETIZER)
    timestep_hours: float = 1.0
    max_hours: float = 0.0                # cap the EHR series length (0 = no cap)
    uncertain_label: Literal["zeros", "ones"] = "zeros"  # CheXpert -1 -> 0 (U-Zeros, MedFuse) or 1
    include_reports: bool = True
    val_from_train: bool = True           # True: val subjects from <task>/val_listfile.csv; False: no val split
    # (the val listfile's stays are then merged into train, counted in the notes)

    def __post_init__(self) -> None:
        if self.task in EHR_TASKS and not self.ehr_root:
            raise ValueError(f"task {self.task!r} needs ehr_root (the mimic4extract data folder)")
        if not self.view_positions:
            raise ValueError("view_positions must list at least one view (MedFuse: [AP])")
        if self.timestep_hours <= 0 or self.ihm_window_hours < 0 or self.max_hours < 0:
            raise ValueError("timestep_hours must be > 0; ihm_window_hours and max_hours >= 0")
