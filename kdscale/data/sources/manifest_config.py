"""The ``data.manifest`` section of a config: :class:`ManifestConfig`, validated at load. The
reader it configures is ``kdscale.data.sources.manifest``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from kdscale.config import path_field
from kdscale.data.record import SPLITS
from kdscale.data.sources.demographics_config import Demographics
from kdscale.data.sources.regions_config import BoxesSpec


@dataclass
class LabelSpec:
    name: str                                            # label name (Record.labels order = config order)
    column: str = ""                                     # manifest column (source: column)
    source: Literal["column", "boxes"] = "column"        # boxes: 1 if the image has a region labelled in `positive`
    positive: list[str] = field(default_factory=list)    # values (or region labels) meaning 1; [] = numeric 0/1 column
    negative: list[str] = field(default_factory=list)    # values meaning 0 (with `positive`)
    contains: bool = False                               # positive if the value contains one of `positive`
    missing: Literal["unknown", "negative", "skip"] = "unknown"  # blank cell / image without regions: NaN, 0 or skip
    # a value that is neither positive nor negative (nor 0/1 for a numeric column): NaN (unknown,
    # excluded from losses and metrics), 0, or a counted skip "label value outside expected set"
    other: Literal["unknown", "negative", "skip"] = "unknown"

    def __post_init__(self) -> None:
        if self.source == "column" and not self.column:
            raise ValueError(f"label {self.name!r}: 'column' is required when source is 'column'")
        if self.source == "boxes" and not self.positive:
            raise ValueError(f"label {self.name!r}: source 'boxes' needs the region labels in 'positive'")
        if self.negative and not self.positive:
            raise ValueError(f"label {self.name!r}: 'negative' needs 'positive' (a numeric column is 0/1)")
        both = {_norm(v) for v in self.positive} & {_norm(v) for v in self.negative}
        if both:
            raise ValueError(f"label {self.name!r}: value(s) {sorted(both)} are both positive and negative")


@dataclass
class ManifestConfig:
    csv: str = path_field()               # the manifest: one row per sample
    root: str = path_field("")            # base folder for relative file paths ("" = the CSV's folder)
    allow_absolute_paths: bool = False    # true: file cells may be absolute paths (resolved, anywhere);
    # false: every file a cell names must resolve (symlinks too) under root, else a counted skip
    patient_column: str = "patient_id"
    key_columns: list[str] = field(default_factory=list)  # empty = patient + row number
    split_column: str = ""                # empty = deterministic patient-level split by hash
    split_values: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "val", "test": "test"})
    split_fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    split_seed: int = 0
    image_column: str = ""
    image_dir: str = ""                   # folder (relative to root) that image paths are relative to
    require_image: bool = False           # true: a row whose image cell is blank or whose file is missing
    # or corrupt is a counted skip; false: it is kept without an image (counted)
    report_column: str = ""               # report text in the manifest itself
    report_file_column: str = ""          # or: path (relative to root) of a UTF-8 text file per row
    require_report: bool = False          # true: blank/empty/unreadable report is a counted skip
    tabular_columns: list[str] = field(default_factory=list)
    categorical_columns: list[str] = field(default_factory=list)  # the rest of tabular_columns are numeric
    missing_values: list[str] = field(default_factory=lambda: ["", "NA", "N/A"])  # cells meaning blank
    # a bad cell of one modality: drop that modality from the sample (counted) or skip the sample
    on_bad_modality: Literal["drop", "skip_sample"] = "drop"
    timeseries_column: str = ""           # path (relative to root) of a per-sample time-series CSV (Hours,<channels>)
    discretizer: str = path_field("")     # discretizer config for those series (configs/ehr/*.yaml)
    timeseries_channels: list[str] = field(default_factory=list)  # channels of it to use ([] = all)
    timestep_hours: float = 1.0           # discretizer bin width
    timeseries_end_column: str = ""       # column with the series end in hours ("" = the last event's time)
    labels: list[LabelSpec] = field(default_factory=list)
    boxes: Optional[BoxesSpec] = None
    demographics: Optional[Demographics] = None  # columns whose role is sex / age / ethnicity
    meta_columns: list[str] = field(default_factory=list)  # carried into Record.meta as written

    def __post_init__(self) -> None:
        if self.report_column and self.report_file_column:
            raise ValueError("set report_column or report_file_column, not both")
        if self.timeseries_column and not self.discretizer:
            raise ValueError("timeseries_column needs a discretizer config")
        if self.timeseries_channels and not self.timeseries_column:
            raise ValueError("timeseries_channels needs timeseries_column")
        bad = [c for c in self.categorical_columns if c not in self.tabular_columns]
        if bad:
            raise ValueError(f"categorical_columns {bad} are not in tabular_columns")
        if set(self.split_fractions) - set(SPLITS) or set(self.split_values) - set(SPLITS):
            raise ValueError(f"split_fractions / split_values keys must be among {list(SPLITS)}")
        if not self.split_column and abs(sum(self.split_fractions.values()) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {self.split_fractions}")
        names = [spec.name for spec in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate label names in {names}")
        if self.boxes is not None and not (self.boxes.manifest_column or self.image_column):
            raise ValueError("boxes need boxes.manifest_column or image_column to join on")


def _norm(value: str) -> str:
    return value.strip().casefold()
