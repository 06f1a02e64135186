"""Generic CSV manifest for a hospital's own data: a config maps columns to the modalities.

One manifest row is one sample. Columns give the image path, the report (text, or a path to a
text file), tabular fields (numeric or categorical), a per-sample time-series CSV (discretized
by ``kdscale.data.ehr``), labels (``LabelSpec``), the patient id, the split (a column, or a
deterministic patient-level hash split) and meta columns. Regions come from a second CSV joined
on a column (``BoxesSpec``), with optional masks cropped to the box.

Every problem is per-sample and counted (``IngestLog.skip``) or, for a missing file/column, a
DataError naming it. Skip details name columns, files and rows, never cell text (notes may be
patient text). Comparisons of label / split values ignore case and surrounding spaces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np

from kdscale.config import path_field
from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.record import SPLITS, Box, Record, RecordError, safe_key
from kdscale.data.sources.base import guarded, open_csv, read_image
from kdscale.data.sources.cbis import encode_mask_png, hash_fraction, skip_reason


@dataclass
class LabelSpec:
    name: str                                            # label name (Record.labels order = config order)
    column: str = ""                                     # manifest column (source: column)
    source: Literal["column", "boxes"] = "column"        # boxes: 1 if the image has a region labelled in `positive`
    positive: list[str] = field(default_factory=list)    # values (or region labels) meaning 1; [] = numeric 0/1 column
    negative: list[str] = field(default_factory=list)    # values meaning 0; if given, other values are counted skips
    contains: bool = False                               # positive if the value contains one of `positive`
    missing: Literal["unknown", "negative", "skip"] = "unknown"  # blank cell / image without regions: NaN, 0 or skip

    def __post_init__(self) -> None:
        if self.source == "column" and not self.column:
            raise ValueError(f"label {self.name!r}: 'column' is required when source is 'column'")
        if self.source == "boxes" and not self.positive:
            raise ValueError(f"label {self.name!r}: source 'boxes' needs the region labels in 'positive'")


@dataclass
class BoxesSpec:
    csv: str = path_field()               # one row per region
    join_column: str = "filename"         # column of this CSV matching the manifest's `manifest_column`
    manifest_column: str = ""             # manifest column to join on ("" = the manifest's image_column)
    label_column: str = "label"
    x_column: str = "x"                   # x, y = top-left corner in pixels of the image
    y_column: str = "y"
    w_column: str = "w"
    h_column: str = "h"
    mask_column: str = ""                 # path (relative to root) of a mask cropped to the box; blank cell = no mask
    keep_labels: list[str] = field(default_factory=list)  # empty = all regions; labels may still use the others


@dataclass
class ManifestConfig:
    csv: str = path_field()               # the manifest: one row per sample
    root: str = path_field("")            # base folder for relative file paths ("" = the CSV's folder)
    patient_column: str = "patient_id"
    key_columns: list[str] = field(default_factory=list)  # empty = patient + row number
    split_column: str = ""                # empty = deterministic patient-level split by hash
    split_values: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "val", "test": "test"})
    split_fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    split_seed: int = 0
    image_column: str = ""
    image_dir: str = ""                   # folder (relative to root) that image paths are relative to
    require_image: bool = False           # true: a row whose image cell is blank or whose file is missing is a
    # counted skip; false: it is kept without an image (counted note). A corrupt image is always a skip.
    report_column: str = ""               # report text in the manifest itself
    report_file_column: str = ""          # or: path (relative to root) of a UTF-8 text file per row
    require_report: bool = False          # true: blank/empty report is a counted skip; false: report None + note
    tabular_columns: list[str] = field(default_factory=list)
    categorical_columns: list[str] = field(default_factory=list)  # the rest of tabular_columns are numeric
    missing_values: list[str] = field(default_factory=lambda: ["", "NA", "N/A"])  # cells meaning blank
    timeseries_column: str = ""           # path (relative to root) of a per-sample time-series CSV (Hours,<channels>)
    discretizer: str = path_field("")     # discretizer config for those series (configs/ehr/*.yaml)
    timestep_hours: float = 1.0           # discretizer bin width
    timeseries_end_column: str = ""       # column with the series end in hours ("" = the last event's time)
    labels: list[LabelSpec] = field(default_factory=list)
    boxes: Optional[BoxesSpec] = None
    meta_columns: list[str] = field(default_factory=list)  # carried into Record.meta (e.g. sex, age)

    def __post_init__(self) -> None:
        if self.report_column and self.report_file_column:
            raise ValueError("set report_column or report_file_column, not both")
        if self.timeseries_column and not self.discretizer:
            raise ValueError("timeseries_column needs a discretizer config")
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


def _finite(value: str, column: str) -> float:
    """A finite float, else RecordError naming the column (never the cell text)."""
    try:
        number = float(value)
    except ValueError:
        raise RecordError(f"non-numeric value: column {column!r}") from None
    if not math.isfinite(number):
        raise RecordError(f"non-finite numeric value: column {column!r} is NaN or inf")
    return number


def read_cropped_mask(path: Path, width: float, height: float) -> bytes:
    """A region mask cropped to its box, as a binary single-channel PNG.

    Region pixels: alpha > 0 when the alpha channel varies; otherwise any colour channel > 0
    (covid-cxr-seg masks are RGBA with alpha 255 everywhere and the region in colour)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise RecordError(f"unreadable mask: file missing: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            size, arr = img.size, np.asarray(img)
            bands = img.getbands()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RecordError(f"unreadable mask: {path}: {exc}") from None
    if size != (int(round(width)), int(round(height))):
        raise RecordError(f"mask size differs from box: {path}: mask {size}, box {width}x{height}")
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    if "A" in bands and arr[..., bands.index("A")].min() < arr[..., bands.index("A")].max():
        region = arr[..., bands.index("A")] > 0
    else:
        colour = [i for i, b in enumerate(bands) if b != "A"] or [0]
        region = arr[..., colour].max(axis=-1) > 0
    return encode_mask_png(region)


class ManifestSource:
    name = "manifest"

    def __init__(self, cfg: ManifestConfig):
        self.cfg = cfg
        self.csv = Path(cfg.csv)
        self.root = Path(cfg.root) if cfg.root else self.csv.parent
        self.label_names = [spec.name for spec in cfg.labels]
        self._missing = {_norm(v) for v in cfg.missing_values}
        self._split_of = {_norm(v): k for k, v in cfg.split_values.items()}

    def describe(self) -> dict:
        cfg = self.cfg
        numeric = [c for c in cfg.tabular_columns if c not in cfg.categorical_columns]
        modalities = [m for m, on in (("image", cfg.image_column), ("report", cfg.report_column or
                      cfg.report_file_column), ("tabular", cfg.tabular_columns), ("ehr", cfg.timeseries_column)) if on]
        return {
            "name": self.name,
            "csv": str(self.csv),
            "label_names": self.label_names,
            "labels": [{"name": s.name, "source": s.source, "column": s.column, "positive": s.positive,
                        "negative": s.negative, "contains": s.contains, "missing": s.missing} for s in cfg.labels],
            "modalities": modalities,
            "tabular_features": {"numeric": numeric, "categorical": list(cfg.categorical_columns)},
            "privileged_note": "report, tabular and ehr may be privileged (teacher-only) inputs; "
                               "the image student never reads them",
            "splits": (f"column {cfg.split_column!r}" if cfg.split_column else
                       f"patient-level hash (seed {cfg.split_seed}) {cfg.split_fractions}"),
            "boxes": None if cfg.boxes is None else {"csv": cfg.boxes.csv, "keep_labels": cfg.boxes.keep_labels},
            "require_image": cfg.require_image,
            # shards check every EHR matrix against this width
            "ehr_feature_names": self._discretizer()[1].feature_names if cfg.timeseries_column else None,
        }

    # -- records -----------------------------------------------------------------------------
    def records(self, log: IngestLog) -> Iterator[Record]:
        return guarded(self._stream(log), log, self.name)

    def _required_columns(self) -> list[str]:
        cfg = self.cfg
        cols = [cfg.patient_column, *cfg.key_columns, cfg.split_column, cfg.image_column, cfg.report_column,
                cfg.report_file_column, *cfg.tabular_columns, cfg.timeseries_column, cfg.timeseries_end_column,
                *[s.column for s in cfg.labels if s.source == "column"], *cfg.meta_columns]
        if cfg.boxes is not None:
            cols.append(cfg.boxes.manifest_column or cfg.image_column)
        return list(dict.fromkeys(c for c in cols if c))

    def _stream(self, log: IngestLog) -> Iterator[Record]:
        regions = self._read_regions() if self.cfg.boxes is not None else {}
        discretizer = self._discretizer() if self.cfg.timeseries_column else None
        joined: set[str] = set()
        for i, row in open_csv(self.csv, self._required_columns(), what="manifest", short_rows="blank"):
            log.count_read()
            if any(v is None for v in row.values()):
                log.note("short manifest row (missing trailing cells read as blank)")
            row = {k: (v or "") for k, v in row.items()}  # short rows: missing trailing cells are blank
            key = ""
            try:
                key = self._key(row, i)
                if self.cfg.boxes is not None:
                    joined.add(row[self.cfg.boxes.manifest_column or self.cfg.image_column].strip())
                yield self._record(row, i, key, regions, discretizer, log)
            except RecordError as exc:
                log.skip(*skip_reason(exc), key=key, file=self.csv, row=i)
        unjoined = sum(len(rows) for value, rows in regions.items() if value not in joined)
        if unjoined:
            log.note("region rows without a manifest row", unjoined)

    def _blank(self, value: Optional[str]) -> bool:
        return value is None or _norm(value) in self._missing

    def _key(self, row: dict, i: int) -> str:
        patient = row[self.cfg.patient_column]
        if self._blank(patient):
            raise RecordError(f"missing patient id: column {self.cfg.patient_column!r} is blank")
        parts = [patient, f"r{i}"] if not self.cfg.key_columns else [row[c] for c in self.cfg.key_columns]
        if any(self._blank(p) for p in parts):
            raise RecordError(f"missing key value: a key column {self.cfg.key_columns} is blank")
        try:
            return safe_key(*[p.strip() for p in parts])
        except RecordError:
            raise RecordError(f"bad key: key columns {self.cfg.key_columns or [self.cfg.patient_column]} "
                              "give no safe key") from None

    def _split(self, row: dict, patient: str) -> str:
        if self.cfg.split_column:
            split = self._split_of.get(_norm(row[self.cfg.split_column]))
            if split is None:
                raise RecordError(f"unknown split value: column {self.cfg.split_column!r} is not one of "
                                  f"{sorted(self.cfg.split_values.values())}")
            return split
        frac, edge = hash_fraction("manifest-split", self.cfg.split_seed, patient), 0.0
        for split in SPLITS:
            edge += self.cfg.split_fractions.get(split, 0.0)
            if frac < edge:
                return split
        return "train" if "train" in self.cfg.split_fractions else next(iter(self.cfg.split_fractions))

    def _record(self, row: dict, i: int, key: str, regions: dict, discretizer, log: IngestLog) -> Record:
        cfg = self.cfg
        patient = row[cfg.patient_column].strip()
        split = self._split(row, patient)
        image, size, image_rel = self._image(row, log)
        region_rows = None
        if cfg.boxes is not None:
            region_rows = regions.get(row[cfg.boxes.manifest_column or cfg.image_column].strip())
        labels = np.array([self._label(spec, row, region_rows) for spec in cfg.labels], dtype=np.float32)
        meta = {"patient_id": patient, "source_file": str(self.csv), "source_row": i}
        if image_rel:
            meta["image_file"] = image_rel
        meta.update({c: (None if self._blank(row[c]) else row[c].strip()) for c in cfg.meta_columns})
        return Record(key=key, patient_id=patient, split=split, labels=labels, image=image, image_size=size,
                      ehr=self._ehr(row, discretizer, log) if discretizer else None,
                      report=self._report(row, log),
                      tabular=self._tabular(row) if cfg.tabular_columns else None,
                      boxes=self._boxes(region_rows or [], size, log), meta=meta)

    # -- modalities --------------------------------------------------------------------------
    def _image(self, row: dict, log: IngestLog) -> tuple[Optional[bytes], Optional[tuple[int, int]], str]:
        cfg = self.cfg
        if not cfg.image_column:
            return None, None, ""
        value = row[cfg.image_column]
        if self._blank(value):
            if cfg.require_image:
                raise RecordError(f"no image: column {cfg.image_column!r} is blank (require_image)")
            log.note("image cell blank (kept without image)")
            return None, None, ""
        rel = str(Path(cfg.image_dir) / value.strip()) if cfg.image_dir else value.strip()
        path = self.root / rel
        if not path.is_file():
            if cfg.require_image:
                raise RecordError(f"image file missing: {rel} (require_image)")
            log.note("image file missing (kept without image)")
            return None, None, rel
        image, size = read_image(path)
        return image, size, rel

    def _report(self, row: dict, log: IngestLog) -> Optional[str]:
        cfg = self.cfg
        text = None
        if cfg.report_column:
            text = row[cfg.report_column]
        elif cfg.report_file_column and not self._blank(row[cfg.report_file_column]):
            path = self.root / row[cfg.report_file_column].strip()
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise RecordError(f"report file missing: {path}") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise RecordError(f"unreadable report file: {path}: {type(exc).__name__}") from None
        elif not cfg.report_file_column:
            return None
        if text is None or not text.strip():
            if cfg.require_report:
                raise RecordError("empty report: the report is blank and require_report is set")
            log.note("report blank or empty (kept without report)")
            return None
        return text.strip()

    def _tabular(self, row: dict) -> dict:
        out: dict = {}
        for column in self.cfg.tabular_columns:
            value = row[column]
            if self._blank(value):
                out[column] = None
            elif column in self.cfg.categorical_columns:
                out[column] = value.strip()
            else:
                out[column] = _finite(value.strip(), column)
        return out

    def _label(self, spec: LabelSpec, row: dict, region_rows: Optional[list]) -> float:
        if spec.source == "boxes":
            if region_rows is None:
                return self._missing_label(spec, "image has no region rows")
            found = {_norm(r[self.cfg.boxes.label_column]) for _, r in region_rows}
            return float(bool(found & {_norm(p) for p in spec.positive}))
        value = row[spec.column]
        if self._blank(value):
            return self._missing_label(spec, f"column {spec.column!r} is blank")
        v = _norm(value)
        if not spec.positive:
            number = _finite(value.strip(), spec.column)
            if number not in (0.0, 1.0):
                raise RecordError(f"label value outside expected set: column {spec.column!r} is not 0/1")
            return number
        positives = [_norm(p) for p in spec.positive]
        if (any(p in v for p in positives) if spec.contains else v in positives):
            return 1.0
        if spec.negative and v not in {_norm(n) for n in spec.negative}:
            raise RecordError(f"label value outside expected set: column {spec.column!r} "
                              f"(expected {spec.positive + spec.negative})")
        return 0.0

    @staticmethod
    def _missing_label(spec: LabelSpec, why: str) -> float:
        if spec.missing == "skip":
            raise RecordError(f"missing label: {spec.name}: {why}")
        return 0.0 if spec.missing == "negative" else float("nan")

    # -- time series -------------------------------------------------------------------------
    def _discretizer(self):
        try:
            from kdscale.data import ehr
        except ImportError as exc:
            raise DataError(f"timeseries_column is set but kdscale.data.ehr cannot be imported: {exc}") from None
        config = ehr.load_discretizer_config(self.cfg.discretizer)
        return ehr, ehr.Discretizer(config, timestep=self.cfg.timestep_hours)

    def _ehr(self, row: dict, discretizer, log: IngestLog) -> Optional[np.ndarray]:
        ehr, disc = discretizer
        value = row[self.cfg.timeseries_column]
        if self._blank(value):
            return None
        path = self.root / value.strip()
        if not path.is_file():
            raise RecordError(f"time-series file missing: {path}")
        try:
            events = ehr.read_timeseries_csv(path, disc.config.channel_names)
            if not events:
                raise RecordError(f"empty time series: {path} has no rows")
            if self.cfg.timeseries_end_column:
                end = _finite(row[self.cfg.timeseries_end_column].strip(), self.cfg.timeseries_end_column)
            else:
                end = float(events[-1][0])
            matrix, counts = disc.transform(events, end)
        except DataError as exc:
            raise RecordError(f"unreadable time series: {exc}") from None
        # as MimicSource._ehr_matrix: NaN/inf is a skip, other unusable values are counted notes
        if counts["non_finite"]:
            raise RecordError(f"non-finite EHR value: {counts['non_finite']} NaN/inf value(s) in {path}")
        for what in ("unknown_categorical", "non_numeric", "unknown_channel"):
            if counts[what]:
                log.note(f"ehr: {what.replace('_', ' ')} value treated as missing", counts[what])
        return matrix

    # -- regions -----------------------------------------------------------------------------
    def _read_regions(self) -> dict[str, list[tuple[int, dict]]]:
        """join value -> [(row, region row)] (region metadata only; masks are read per sample)."""
        spec = self.cfg.boxes
        required = [spec.join_column, spec.label_column, spec.x_column, spec.y_column, spec.w_column,
                    spec.h_column] + ([spec.mask_column] if spec.mask_column else [])
        regions: dict[str, list[tuple[int, dict]]] = {}
        for i, row in open_csv(spec.csv, required, what="boxes"):
            row = {k: (v or "") for k, v in row.items()}
            regions.setdefault(row[spec.join_column].strip(), []).append((i, row))
        return regions

    def _boxes(self, region_rows: list, size: Optional[tuple[int, int]], log: IngestLog) -> list[Box]:
        spec = self.cfg.boxes
        if spec is None:
            return []
        keep = {_norm(k) for k in spec.keep_labels}
        boxes = []
        for i, r in region_rows:
            label = r[spec.label_column].strip()
            if keep and _norm(label) not in keep:
                continue
            where = f"{Path(spec.csv).name} row {i}"
            try:
                x, y, w, h = (_finite((r[c] or "").strip(), c) for c in
                              (spec.x_column, spec.y_column, spec.w_column, spec.h_column))
            except RecordError as exc:
                raise RecordError(f"bad box: {where}: {exc}") from None
            if w <= 0 or h <= 0:
                raise RecordError(f"bad box: {where}: width/height not positive")
            if size is not None and (x < 0 or y < 0 or x + w > size[0] or y + h > size[1]):
                raise RecordError(f"box outside image: {where}: ({x}, {y}, {w}, {h}) in image {size}")
            mask = None
            if spec.mask_column and not self._blank(r[spec.mask_column]):
                mask = read_cropped_mask(self.root / r[spec.mask_column].strip(), w, h)
            elif spec.mask_column:
                log.note("region without mask")
            boxes.append(Box(label=label, x=x, y=y, w=w, h=h, mask_png=mask))
        return boxes
