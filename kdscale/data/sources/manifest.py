"""Generic CSV manifest for a hospital's own data: a config maps columns to the modalities."""
from __future__ import annotations

from dataclasses import dataclass, field

from kdscale.config import path_field


@dataclass
class LabelSpec:
    name: str
    column: str
    positive: list[str] = field(default_factory=list)   # values meaning 1; empty = the column is numeric 0/1
    contains: bool = False                               # positive if the value contains one of `positive`


@dataclass
class BoxesSpec:
    csv: str = path_field()               # one row per region
    join_column: str = "filename"         # column matching the manifest's image file name
    label_column: str = "label"
    x_column: str = "x"
    y_column: str = "y"
    w_column: str = "w"
    h_column: str = "h"
    mask_column: str = ""                 # path (relative to root) of a mask cropped to the box
    keep_labels: list[str] = field(default_factory=list)  # empty = all regions


@dataclass
class ManifestConfig:
    csv: str = path_field()
    root: str = path_field("")            # base folder for relative file paths ("" = the CSV's folder)
    patient_column: str = "patient_id"
    key_columns: list[str] = field(default_factory=list)  # empty = patient + row number
    split_column: str = ""                # empty = deterministic patient-level split by hash
    split_values: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "val", "test": "test"})
    split_fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    split_seed: int = 0
    image_column: str = ""
    image_dir: str = ""                   # folder (relative to root) that image paths are relative to
    require_image: bool = False           # rows whose image file is missing: skip (recorded) when true
    report_column: str = ""
    report_file_column: str = ""
    tabular_columns: list[str] = field(default_factory=list)
    categorical_columns: list[str] = field(default_factory=list)  # the rest of tabular_columns are numeric
    timeseries_column: str = ""           # path of a per-sample time-series CSV
    discretizer: str = path_field("")     # discretizer config for those series
    labels: list[LabelSpec] = field(default_factory=list)
    boxes: BoxesSpec | None = None
    meta_columns: list[str] = field(default_factory=list)  # carried into Record.meta (e.g. sex, age)
