"""Generic CSV manifest for a hospital's own data: a config maps columns to the modalities.

One manifest row is one sample. Columns give the image path, the report (text, or a path to a
text file), tabular fields (numeric or categorical), a per-sample time-series CSV (discretized
by ``kdscale.data.ehr``), labels (``LabelSpec``), the patient id, the split (a column, or a
deterministic patient-level hash split), demographics with roles (``Demographics``: typed
``sex`` / ``age`` / ``ethnicity`` meta) and other meta columns. Regions come from a second CSV
(x, y, w, h or circles) or a COCO JSON joined on a column (``kdscale.data.sources.regions``),
with optional masks cropped to the box.

Every problem is per-sample and counted (``IngestLog.skip``) or, for a missing file/column, a
duplicate column name or an empty manifest, a DataError naming it. A bad cell of one modality
(a non-numeric tabular value, an unreadable report or time series, a corrupt optional image)
removes that modality from the sample (``IngestLog.drop_modality``, counted with its reason)
unless ``on_bad_modality: skip_sample``. Every path a cell names must resolve (symlinks too)
under ``root`` ("path outside the data root" skip otherwise). Skip details name columns, files
and rows, never cell text (notes may be patient text). Comparisons of label / split values
ignore case and surrounding spaces.

Labels: a value in ``positive`` is 1, in ``negative`` 0, a blank cell follows ``missing`` and any
other value follows ``other`` (default: unknown, NaN -- never silently negative). The raw values
that mapped to each outcome are tallied per split (``IngestLog.label_values``), and a listed
value that never occurs is warned about at the end of the stream.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.labels import LabelTally, never_seen, outcome_of
from kdscale.data.record import SPLITS, Box, Record, RecordError, safe_key
from kdscale.data.sources.base import OUTSIDE_ROOT, guarded, open_csv, read_image, resolve_under_root
from kdscale.data.sources.cbis import encode_mask_png, hash_fraction, skip_reason
from kdscale.data.sources.demographics import Demographics, DemographicsReader
from kdscale.data.sources.manifest_config import LabelSpec, ManifestConfig, _norm  # noqa: F401  (re-exported)
from kdscale.data.sources.regions import BoxesSpec, Region, read_regions, region_box

logger = logging.getLogger(__name__)

__all__ = ["BoxesSpec", "Demographics", "LabelSpec", "ManifestConfig", "ManifestSource"]


def _finite(value: str, column: str) -> float:
    """A finite float, else RecordError naming the column (never the cell text)."""
    try:
        number = float(value)
    except ValueError:
        raise RecordError(f"non-numeric value: column {column!r}") from None
    if not math.isfinite(number):
        raise RecordError(f"non-finite numeric value: column {column!r} is NaN or inf")
    return number


def _number(value: str) -> Optional[float]:
    """A finite float, or None (a label cell that is not a number is an 'other' value)."""
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def read_cropped_mask(path: Path, width: float, height: float) -> bytes:
    """A region mask cropped to its box, as a binary single-channel PNG.

    Region pixels: alpha > 0 when the alpha channel varies; otherwise any colour channel > 0
    (covid-cxr-seg masks are RGBA with alpha 255 everywhere and the region in colour)."""
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
        self._demographics = DemographicsReader(cfg.demographics, cfg.meta_columns, self._missing)
        self._disc = None

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
                        "negative": s.negative, "contains": s.contains, "missing": s.missing, "other": s.other}
                       for s in cfg.labels],
            "modalities": modalities,
            "tabular_features": {"numeric": numeric, "categorical": list(cfg.categorical_columns)},
            "privileged_note": "report, tabular and ehr may be privileged (teacher-only) inputs; "
                               "the image student never reads them",
            "splits": (f"column {cfg.split_column!r}" if cfg.split_column else
                       f"patient-level hash (seed {cfg.split_seed}) {cfg.split_fractions}"),
            "boxes": None if cfg.boxes is None else {"format": cfg.boxes.format, "file": cfg.boxes.file,
                                                     "keep_labels": cfg.boxes.keep_labels},
            "demographics": {role: column for role, column in self._demographics.columns.items() if column},
            "require_image": cfg.require_image,
            "on_bad_modality": cfg.on_bad_modality,
            # shards check every EHR matrix against this width
            "ehr_feature_names": self._discretizer()[1].feature_names if cfg.timeseries_column else None,
        }

    # -- records -----------------------------------------------------------------------------
    def records(self, log: IngestLog) -> Iterator[Record]:
        if log.label_values is None:
            log.label_values = LabelTally()
        self._raw_labels: dict[str, list] = {}
        for record in guarded(self._stream(log), log, self.name):
            # tallied only for samples that are kept (after the duplicate-key guard), so the
            # label table's raw-value counts add up to its positive / negative / unknown counts
            for spec, (value, raw) in zip(self.cfg.labels, self._raw_labels.pop(record.key, [])):
                log.label_values.add(record.split, spec.name, outcome_of(value), raw)
            yield record

    def _required_columns(self) -> list[str]:
        cfg = self.cfg
        cols = [cfg.patient_column, *cfg.key_columns, cfg.split_column, cfg.image_column, cfg.report_column,
                cfg.report_file_column, *cfg.tabular_columns, cfg.timeseries_column, cfg.timeseries_end_column,
                *[s.column for s in cfg.labels if s.source == "column"], *cfg.meta_columns,
                *self._demographics.required_columns()]
        if cfg.boxes is not None:
            cols.append(cfg.boxes.manifest_column or cfg.image_column)
        return list(dict.fromkeys(c for c in cols if c))

    def _stream(self, log: IngestLog) -> Iterator[Record]:
        regions = read_regions(self.cfg.boxes) if self.cfg.boxes is not None else {}
        discretizer = self._discretizer() if self.cfg.timeseries_column else None
        self._seen_values: dict[str, set] = {spec.name: set() for spec in self.cfg.labels}
        self._extra_channels: set[str] = set()
        joined: set[str] = set()
        rows = 0
        for i, row in open_csv(self.csv, self._required_columns(), what="manifest", short_rows="blank"):
            rows += 1
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
        if rows == 0:
            raise DataError("the manifest has a header but no data rows", file=self.csv)
        unjoined = sum(len(rs) for value, rs in regions.items() if value not in joined)
        if unjoined:
            log.note("region rows without a manifest row", unjoined)
        self._warn_after_stream(log)

    def _warn_after_stream(self, log: IngestLog) -> None:
        """Loud warnings for configurations that silently map everything one way."""
        for spec in self.cfg.labels:
            if spec.source != "column":
                continue
            seen = self._seen_values[spec.name]
            listed = (spec.positive + spec.negative) if spec.positive else ["0", "1"]
            if spec.contains:   # a `contains` positive matches inside values
                absent = [v for v in spec.positive if not any(_norm(v) in s for s in seen)]
                absent += never_seen(spec.negative, seen)
            else:
                absent = never_seen(listed, seen)
            if absent:
                logger.warning("manifest: label %r: listed value(s) %s never occur in column %r; %d distinct "
                               "value(s) occur (see the label table)", spec.name, absent, spec.column, len(seen))
                log.note(f"label {spec.name}: listed value(s) never occur: {absent}")
        if self._extra_channels:
            logger.warning("manifest: time-series column(s) %s are not channels in use: ignored",
                           sorted(self._extra_channels))
            log.note(f"ehr: time-series columns ignored (not channels in use): {sorted(self._extra_channels)}")

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

    def _path(self, value: str, what: str, base: Optional[Path] = None) -> Path:
        return resolve_under_root(base or self.root, value, what=what,
                                  allow_absolute=self.cfg.allow_absolute_paths)

    def _modality(self, name: str, read, log: IngestLog, key: str, row: int):
        """``read()`` for one modality; a RecordError drops just that modality (counted) unless
        on_bad_modality is skip_sample. A path outside the root always skips the sample."""
        try:
            return read()
        except RecordError as exc:
            if self.cfg.on_bad_modality == "skip_sample" or str(exc).startswith(OUTSIDE_ROOT):
                raise
            reason, detail = skip_reason(exc)
            log.drop_modality(name, reason, detail, key=key, file=self.csv, row=row)
            return None

    def _record(self, row: dict, i: int, key: str, regions: dict, discretizer, log: IngestLog) -> Record:
        cfg = self.cfg
        patient = row[cfg.patient_column].strip()
        split = self._split(row, patient)
        image, size, image_rel = self._image(row, log, key, i)
        region_rows = None
        if cfg.boxes is not None:
            region_rows = regions.get(row[cfg.boxes.manifest_column or cfg.image_column].strip())
        mapped = [self._label(spec, row, region_rows) for spec in cfg.labels]
        meta = {"patient_id": patient, "source_file": str(self.csv), "source_row": i}
        if image_rel:
            meta["image_file"] = image_rel
        meta.update({c: (None if self._blank(row[c]) else row[c].strip()) for c in cfg.meta_columns})
        meta.update(self._demographics.read(row, log))   # typed sex / age / ethnicity
        ehr = self._modality("ehr", lambda: self._ehr(row, discretizer, log), log, key, i) if discretizer else None
        report = self._report(row, log) if cfg.require_report else \
            self._modality("report", lambda: self._report(row, log), log, key, i)
        tabular = self._modality("tabular", lambda: self._tabular(row), log, key, i) \
            if cfg.tabular_columns else None
        boxes = self._boxes(region_rows or [], size, log)
        record = Record(key=key, patient_id=patient, split=split, labels=[v for v, _ in mapped], image=image,
                        image_size=size, ehr=ehr, report=report, tabular=tabular, boxes=boxes, meta=meta)
        self._raw_labels[key] = mapped
        return record

    # -- modalities --------------------------------------------------------------------------
    def _image(self, row: dict, log: IngestLog, key: str, i: int
               ) -> tuple[Optional[bytes], Optional[tuple[int, int]], str]:
        cfg = self.cfg
        if not cfg.image_column:
            return None, None, ""
        value = row[cfg.image_column]
        if self._blank(value):
            if cfg.require_image:
                raise RecordError(f"no image: column {cfg.image_column!r} is blank (require_image)")
            log.note("image cell blank (kept without image)")
            return None, None, ""
        value = value.strip()
        rel = str(Path(cfg.image_dir) / value) if cfg.image_dir and not Path(value).is_absolute() else value
        # image paths stay under root/image_dir (the folder they are declared relative to)
        path = self._path(value, "image", self.root / cfg.image_dir if cfg.image_dir else None)
        if not path.is_file():
            if cfg.require_image:
                raise RecordError(f"image file missing: {rel} (require_image)")
            log.note("image file missing (kept without image)")
            return None, None, rel
        if cfg.require_image:
            image, size = read_image(path)
        else:
            found = self._modality("image", lambda: read_image(path), log, key, i)
            image, size = found if found is not None else (None, None)
        return image, size, rel

    def _report(self, row: dict, log: IngestLog) -> Optional[str]:
        cfg = self.cfg
        text = None
        if cfg.report_column:
            text = row[cfg.report_column]
        elif cfg.report_file_column and not self._blank(row[cfg.report_file_column]):
            value = row[cfg.report_file_column].strip()
            path = self._path(value, "report")
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise RecordError(f"report file missing: {value}") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise RecordError(f"unreadable report file: {value}: {type(exc).__name__}") from None
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

    def _label(self, spec: LabelSpec, row: dict, region_rows: Optional[list]) -> tuple[float, str]:
        """(0 / 1 / NaN, the raw value shown in the label table)."""
        if spec.source == "boxes":
            if region_rows is None:
                return self._missing_label(spec, "image has no region rows"), "<no region rows>"
            found = {_norm(r.label) for r in region_rows}
            hit = bool(found & {_norm(p) for p in spec.positive})
            return float(hit), ("<region: " + ("listed label" if hit else "other labels") + ">")
        value = row[spec.column]
        if self._blank(value):
            return self._missing_label(spec, f"column {spec.column!r} is blank"), value
        v = _norm(value)
        self._seen_values[spec.name].add(v)
        if not spec.positive:
            number = _number(value)
            if number in (0.0, 1.0):
                return number, value
            return self._other_label(spec, "is not 0/1"), value
        positives = [_norm(p) for p in spec.positive]
        if (any(p in v for p in positives) if spec.contains else v in positives):
            return 1.0, value
        if v in {_norm(n) for n in spec.negative}:
            return 0.0, value
        why = f"is neither positive nor negative (expected {spec.positive + spec.negative})"
        return self._other_label(spec, why), value

    @staticmethod
    def _other_label(spec: LabelSpec, why: str) -> float:
        if spec.other == "skip":
            raise RecordError(f"label value outside expected set: column {spec.column!r} {why}")
        return 0.0 if spec.other == "negative" else float("nan")

    @staticmethod
    def _missing_label(spec: LabelSpec, why: str) -> float:
        if spec.missing == "skip":
            raise RecordError(f"missing label: {spec.name}: {why}")
        return 0.0 if spec.missing == "negative" else float("nan")

    # -- time series -------------------------------------------------------------------------
    def _discretizer(self):
        if self._disc is None:
            try:
                # guarded: a missing EHR dependency becomes a DataError naming the setting
                from kdscale.data import ehr
            except ImportError as exc:
                raise DataError(f"timeseries_column is set but kdscale.data.ehr cannot be imported: {exc}") from None
            config = ehr.select_channels(ehr.load_discretizer_config(self.cfg.discretizer),
                                         self.cfg.timeseries_channels, "data.manifest.timeseries_channels")
            self._disc = (ehr, ehr.Discretizer(config, timestep=self.cfg.timestep_hours))
        return self._disc

    def _ehr(self, row: dict, discretizer, log: IngestLog) -> Optional[np.ndarray]:
        ehr, disc = discretizer
        value = row[self.cfg.timeseries_column]
        if self._blank(value):
            return None
        value = value.strip()
        path = self._path(value, "time-series")
        if not path.is_file():
            raise RecordError(f"time-series file missing: {value}")
        try:
            # columns that are not channels in use are ignored (listed once after the stream);
            # channels the file lacks are never observed (missing, mask 0)
            events = ehr.read_timeseries_csv(path, disc.config.channel_names, ignore_extra=True,
                                             extra_seen=self._extra_channels)
            if not events:
                raise RecordError(f"empty time series: {value} has no rows")
            if self.cfg.timeseries_end_column:
                end = _finite(row[self.cfg.timeseries_end_column].strip(), self.cfg.timeseries_end_column)
            else:
                end = float(events[-1][0])
            matrix, counts = disc.transform(events, end)
        except DataError as exc:
            raise RecordError(f"unreadable time series: {exc}") from None
        # as MimicSource._ehr_matrix: NaN/inf is unusable, other unusable values are counted notes
        if counts["non_finite"]:
            raise RecordError(f"non-finite EHR value: {counts['non_finite']} NaN/inf value(s) in {value}")
        for what in ("unknown_categorical", "non_numeric", "unknown_channel"):
            if counts[what]:
                log.note(f"ehr: {what.replace('_', ' ')} value treated as missing", counts[what])
        for channel, n in counts.get("out_of_range_by_channel", {}).items():
            action = next(c.out_of_range for c in disc.channels if c.name == channel)
            done = "set to missing" if action == "missing" else "clipped"
            log.note(f"ehr: {channel} outside its valid range ({done})", n)
        return matrix

    # -- regions -----------------------------------------------------------------------------
    def _boxes(self, region_rows: list[Region], size: Optional[tuple[int, int]], log: IngestLog) -> list[Box]:
        spec = self.cfg.boxes
        if spec is None:
            return []
        keep = {_norm(k) for k in spec.keep_labels}
        boxes = []
        for region in region_rows:
            if keep and _norm(region.label) not in keep:
                continue
            x, y, w, h, clipped = region_box(spec, region, size)
            if clipped:
                log.note("circle box clipped to the image")
            mask = None
            if spec.mask_column and not self._blank(region.mask):
                mask = read_cropped_mask(self._path(region.mask, "mask"), w, h)
            elif spec.mask_column:
                log.note("region without mask")
            boxes.append(Box(label=region.label, x=x, y=y, w=w, h=h, mask_png=mask))
        return boxes
