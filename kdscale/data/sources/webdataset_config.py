"""The ``data.webdataset`` section of a config: :class:`WebDatasetConfig`, validated at load. The
reader it configures is ``kdscale.data.sources.webdataset``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdscale.config import path_field
from kdscale.data.record import SPLITS


@dataclass
class WebDatasetConfig:
    root: str = path_field()                 # folder holding the corpus; shard patterns are relative to it
    splits: dict[str, str] = field(default_factory=dict)  # split -> shard pattern ({a..b} braces, * globs)
    label_names: list[str] = field(default_factory=list)
    labels_from: Literal["cls", "json"] = "cls"
    cls_ext: str = "cls"                     # member holding the class index (text)
    json_ext: str = "json"                   # member holding per-sample metadata (a JSON object)
    labels_key: str = "labels"               # labels_from=json: list of 0/1/null, or {label name: 0/1/null}
    patient_key: str = ""                    # key of the JSON member with the patient id ("" = sample key)
    image_exts: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png"])
    report_ext: str = ""
    tabular_ext: str = ""

    def __post_init__(self) -> None:
        if not self.splits:
            raise ValueError("splits must map at least one of train/val/test to a shard pattern")
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"splits: unknown split(s) {sorted(unknown)}; valid: {list(SPLITS)}")
        if not self.label_names:
            raise ValueError("label_names must name the labels (for cls: in class-index order)")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"duplicate label names in {self.label_names}")
