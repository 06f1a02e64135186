"""The ``boxes`` subsection of a source config: :class:`BoxesSpec`, validated at load. The
region reader it configures is ``kdscale.data.sources.regions``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdscale.config import path_field


@dataclass
class BoxesSpec:
    csv: str = path_field("")             # xywh / circle: one row per region
    format: Literal["xywh", "circle", "coco"] = "xywh"
    coco_json: str = path_field("")       # coco: the COCO JSON (instead of csv)
    join_column: str = "filename"         # column of this CSV matching the manifest's `manifest_column`
    manifest_column: str = ""             # manifest column to join on ("" = the manifest's image_column)
    label_column: str = "label"
    x_column: str = "x"                   # xywh: top-left corner; circle: centre
    y_column: str = "y"
    w_column: str = "w"                   # xywh only
    h_column: str = "h"
    r_column: str = "r"                   # circle only: radius in pixels
    y_origin: Literal["top", "bottom"] = "top"  # CSV formats: where y = 0 is
    mask_column: str = ""                 # path (relative to root) of a mask cropped to the box; blank cell = no mask
    keep_labels: list[str] = field(default_factory=list)  # empty = all regions; labels may still use the others

    def __post_init__(self) -> None:
        if self.format == "coco":
            if not self.coco_json or self.csv:
                raise ValueError("boxes.format coco reads boxes.coco_json (and no boxes.csv)")
            if self.mask_column:
                raise ValueError("boxes.mask_column is for the CSV formats; COCO masks are not read")
            if self.y_origin != "top":
                raise ValueError("boxes.y_origin: COCO boxes are always top-left based")
        elif not self.csv or self.coco_json:
            raise ValueError(f"boxes.format {self.format} reads boxes.csv (and no boxes.coco_json)")

    @property
    def file(self) -> str:
        return self.coco_json if self.format == "coco" else self.csv
