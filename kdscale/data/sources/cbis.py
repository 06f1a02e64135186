"""CBIS-DDSM source: TCIA case-description CSVs, full mammograms, ROI masks -> boxes; the case
metadata is the tabular (privileged) modality; pathology is the label (method-and-data.md 4.1).

* One CSV row is one abnormality. Rows are grouped by their ``image file path`` into one Record
  per mammogram (a whole-image student): label ``malignant`` = any abnormality of the image is
  MALIGNANT; one Box per abnormality = the bounding box of its ROI mask's lesion pixels, with the
  mask cropped to the box (binary PNG) in ``Box.mask_png``.
* Columns are read by NAME: mass and calc files differ (``breast_density`` vs ``breast density``),
  and some copies add or reorder columns.
* Images: JPEG/PNG only. The CBIS DICOM originals are not read (no DICOM decoder in kdscale): a
  ``.dcm`` path is looked up with ``converted_suffixes`` (DICOMs converted in place, e.g. with
  ``dcmj2pnm``), or mapped through the Kaggle JPEG re-packaging's ``csv/dicom_info.csv``.
* Splits: the *test* CSVs are ``test``; ``val`` patients are drawn from the train CSVs by a hash
  of (split_seed, patient id), so the split is patient-level and stable across runs.
* Tabular: breast density, side, view, abnormality counts, shape/margins, calc type/distribution,
  subtlety. The BI-RADS ``assessment`` almost is the label (leakage), so it is only included with
  ``include_assessment``; the teacher's feature list is declared by ``describe()`` and logged.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.record import Box, Record, RecordError, safe_key
from kdscale.data.sources.base import LeakageError, guarded, open_csv, read_image, resolve_under_root
from kdscale.data.sources.cbis_config import CSV_KINDS, CbisConfig  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

PATHOLOGIES = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK")
DENSITY_COLUMNS = ("breast_density", "breast density")   # mass files use "_", calc files a space
COMMON_COLUMNS = ("patient_id", "left or right breast", "image view", "abnormality id",
                  "abnormality type", "assessment", "pathology", "subtlety", "image file path",
                  "ROI mask file path")
KIND_COLUMNS = {"mass": ("mass shape", "mass margins"), "calc": ("calc type", "calc distribution")}
DICOM_INFO_COLUMNS = ("image_path", "SeriesDescription", "SeriesInstanceUID", "PatientID")
FULL_IMAGE, ROI_MASK = "full mammogram images", "roi mask images"   # dicom_info SeriesDescription


@dataclass
class _Abnormality:
    """One CSV row, reduced to the fields kdscale uses (all raw strings, stripped)."""
    kind: str                 # "mass" | "calc" (from the file, not the row)
    split: str                # "train" | "test" (from the file)
    file: str
    row: int
    values: dict


def hash_fraction(*parts: object) -> float:
    """A stable number in [0, 1) for ids (hash() is salted per process; sha256 is not)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A boolean [H, W] mask as a single-channel PNG (0 / 255)."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def mask_to_box(path: Path, image_size: tuple[int, int], threshold: int, label: str) -> Box:
    """Bounding box of a full-image ROI mask's lesion pixels, with the mask cropped to it."""
    if not path.is_file():
        raise RecordError(f"ROI mask missing: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            # palette/bilevel masks via L; 16-bit masks (DICOMs converted to PNG) keep their range
            size = img.size
            arr = np.asarray(img.convert("L") if img.mode in ("1", "P", "PA", "LA") else img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RecordError(f"unreadable ROI mask: {path}: {exc}") from None
    if size != tuple(image_size):
        raise RecordError(f"ROI mask size differs from image: {path}: mask {size}, image {tuple(image_size)}")
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1)
    lesion = arr > (threshold * 257 if arr.max() > 255 else threshold)
    rows, cols = np.flatnonzero(lesion.any(axis=1)), np.flatnonzero(lesion.any(axis=0))
    if rows.size == 0:
        raise RecordError(f"empty ROI mask: {path}")
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return Box(label=label, x=float(x0), y=float(y0), w=float(x1 - x0), h=float(y1 - y0),
               mask_png=encode_mask_png(lesion[y0:y1, x0:x1]))


def _printable(value: str) -> str:
    """A cell value fit for a log: short codes only; anything else may be patient text."""
    if len(value) <= 30 and re.fullmatch(r"[A-Za-z0-9_]*", value):
        return repr(value)
    return "<unexpected value>"


def skip_reason(exc: RecordError) -> tuple[str, str]:
    """(short counted category, detail) for a RecordError raised while reading a sample.

    Messages are written "<reason>: <detail>"; read_image's wording maps onto two categories."""
    text = str(exc)
    if text.startswith("sample ") and ": " in text:   # Record.__post_init__ prefixes the key
        text = text.split(": ", 1)[1]
    reason, _, detail = text.partition(": ")
    for prefix, category in (("image file not found", "image file missing"),
                             ("image file is empty", "corrupt image"),
                             ("image file unreadable", "corrupt image"),
                             ("corrupt or truncated image", "corrupt image"),
                             ("image has no pixels", "corrupt image")):
        if text.startswith(prefix):
            return category, text
    return reason, detail


def _int_in(value: str, low: int, high: int) -> Optional[int]:
    """An integer in [low, high], else None (blank, text, 0 density ...)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(number) or number != int(number) or not low <= number <= high:
        return None
    return int(number)


class CbisSource:
    name = "cbis"
    label_names = ["malignant"]

    def __init__(self, cfg: CbisConfig):
        self.cfg = cfg
        self.root = Path(cfg.root)

    # -- description -------------------------------------------------------------------------
    def tabular_features(self) -> dict[str, list[str]]:
        numeric = ["breast_density", "n_mass", "n_calc", "subtlety_min", "subtlety_max"]
        if self.cfg.include_assessment:
            numeric.append("assessment_max")
        categorical = ["laterality", "view", "mass_shape", "mass_margins", "calc_type", "calc_distribution"]
        return {"numeric": numeric, "categorical": categorical}

    def describe(self) -> dict:
        features = self.tabular_features()
        return {
            "name": self.name,
            "label_names": self.label_names,
            "label_definition": "malignant = any abnormality of the image has pathology MALIGNANT "
                                "(BENIGN and BENIGN_WITHOUT_CALLBACK = 0)",
            "unit": "one record per full mammogram (abnormality rows aggregated)",
            "abnormality": self.cfg.abnormality,
            "splits": f"test = the test CSVs; val = {self.cfg.val_fraction:.0%} of train patients by "
                      f"hash (seed {self.cfg.split_seed}); patient-level",
            "privileged_modalities": ["tabular"],
            "tabular_features": features,
            "teacher_features": features["numeric"] + features["categorical"],
            "leakage": ("INCLUDED: BI-RADS assessment (assessment_max) nearly is the label"
                        if self.cfg.include_assessment else "BI-RADS assessment excluded"),
            "boxes": "one per abnormality: bounding box of the ROI mask (pixels > "
                     f"{self.cfg.mask_threshold}), mask cropped to the box",
            "image_formats": "JPEG/PNG; DICOM originals are not read",
            "ehr_feature_names": None,
        }

    # -- reading the CSVs --------------------------------------------------------------------
    def _csv_kinds(self) -> list[str]:
        kinds = [k for k in CSV_KINDS if self.cfg.abnormality in ("both", k.split("_")[0])]
        missing = [k for k in kinds if k not in self.cfg.csv_files]
        if missing:
            raise DataError(f"cbis.csv_files has no entry for {missing} (abnormality={self.cfg.abnormality})")
        return kinds

    def _read_rows(self) -> Iterator[_Abnormality]:
        for csv_kind in self._csv_kinds():
            kind, split = csv_kind.split("_")
            path = self.root / self.cfg.csv_files[csv_kind]
            required = COMMON_COLUMNS + KIND_COLUMNS[kind]
            for i, row in open_csv(path, required, what=f"CBIS {csv_kind} case-description"):
                if i == 2 and not any(c in row for c in DENSITY_COLUMNS):
                    raise DataError(f"missing column 'breast_density' / 'breast density'; the header has "
                                    f"{len(row)} column(s)", file=path, column="breast_density")
                values = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                density = values.get("breast_density", values.get("breast density", ""))
                values["breast_density"] = density
                yield _Abnormality(kind, split, str(path), i, values)

    def _group_images(self) -> dict[str, list[_Abnormality]]:
        """image file path -> its abnormality rows (CSV metadata only; images are streamed later)."""
        groups: dict[str, list[_Abnormality]] = {}
        for abn in self._read_rows():
            image_path = abn.values["image file path"].replace("\\", "/")
            groups.setdefault(f"{abn.split}|{image_path}", []).append(abn)
        return groups

    def _dicom_map(self) -> Optional[dict[tuple[str, str], str]]:
        """(SeriesInstanceUID or PatientID, series description) -> JPEG path, from dicom_info.csv."""
        if not self.cfg.dicom_info_csv:
            return None
        path = self.root / self.cfg.dicom_info_csv
        mapping: dict[tuple[str, str], str] = {}
        for _, row in open_csv(path, DICOM_INFO_COLUMNS, what="Kaggle CBIS dicom_info"):
            description = row["SeriesDescription"].strip().lower()
            image_path = row["image_path"].strip().replace("\\", "/")
            if self.cfg.dicom_info_prefix and image_path.startswith(self.cfg.dicom_info_prefix):
                image_path = image_path[len(self.cfg.dicom_info_prefix):]
            for ident in (row["SeriesInstanceUID"].strip(), row["PatientID"].strip()):
                if ident:
                    mapping.setdefault((ident, description), image_path)
        return mapping

    def _resolve(self, csv_path: str, description: str, dicom_map, what: str) -> Path:
        """The JPEG/PNG file for a CSV path (see the module docstring). Raises RecordError."""
        rel = csv_path.strip().replace("\\", "/")
        if not rel:
            raise RecordError(f"{what} path blank in the CSV")
        if dicom_map is not None:
            parts = rel.split("/")
            # the series folder (parts[-2]) is the SeriesInstanceUID; the first folder is PatientID
            for ident in ([parts[-2]] if len(parts) >= 2 else []) + [parts[0]]:
                hit = dicom_map.get((ident, description))
                if hit:   # a path from dicom_info.csv: it too must stay under root
                    return resolve_under_root(self.root, hit, what=what)
            raise RecordError(f"not in dicom_info: no {description!r} entry for {rel}")
        # CSV paths are data, not config: resolved (symlinks too) they must stay under root/image_dir
        base = self.root / self.cfg.image_dir
        path = resolve_under_root(base, rel, what=what)
        if Path(rel).suffix.lower() != ".dcm":
            return path
        for suffix in self.cfg.converted_suffixes:
            converted = resolve_under_root(base, str(Path(rel).with_suffix(suffix)), what=what)
            if converted.is_file():
                return converted
        if not path.is_file():
            raise RecordError(f"{what} missing: neither {rel} nor a converted "
                              f"{'/'.join(self.cfg.converted_suffixes)} copy exists")
        raise RecordError(f"DICOM not read: {rel} has no converted {'/'.join(self.cfg.converted_suffixes)} "
                          "copy (kdscale reads JPEG/PNG; set dicom_info_csv for the Kaggle JPEG tree)")

    # -- records -----------------------------------------------------------------------------
    def records(self, log: IngestLog) -> Iterator[Record]:
        return guarded(self._stream(log), log, self.name)

    def _stream(self, log: IngestLog) -> Iterator[Record]:
        features = self.tabular_features()
        logger.info("cbis: tabular teacher features (declared in describe()): %s",
                    features["numeric"] + features["categorical"])
        if self.cfg.include_assessment:
            logger.warning("cbis: include_assessment is on: BI-RADS assessment nearly is the label (leakage)")
        groups = self._group_images()
        dicom_map = self._dicom_map()
        overlap = self._overlapping_patients(groups)
        for rows in groups.values():
            log.count_read()
            first = rows[0]
            patient = first.values["patient_id"]
            if first.split == "train" and patient in overlap:
                log.skip("patient also in a test CSV", f"patient {patient} (patient_overlap=skip_train)",
                         file=first.file, row=first.row)
                continue
            try:
                yield self._image_record(rows, dicom_map, log)
            except RecordError as exc:
                log.skip(*skip_reason(exc), key=self._key(first), file=first.file, row=first.row)

    def _overlapping_patients(self, groups: dict[str, list[_Abnormality]]) -> set[str]:
        where: dict[str, dict[str, str]] = {}
        for rows in groups.values():
            where.setdefault(rows[0].values["patient_id"], {}).setdefault(rows[0].split, rows[0].file)
        both = {p: files for p, files in where.items() if len(files) > 1}
        if both and self.cfg.patient_overlap == "error":
            patient, files = sorted(both.items())[0]
            raise LeakageError(f"cbis: patient {patient} is in two splits ('train' in {files['train']} and "
                               f"'test' in {files['test']}); {len(both)} such patient(s)")
        return set(both)

    @staticmethod
    def _key(first: _Abnormality) -> str:
        folder = first.values["image file path"].replace("\\", "/").split("/")[0]
        v = first.values
        try:
            return safe_key(folder) if folder else safe_key(first.kind, v["patient_id"],
                                                            v["left or right breast"], v["image view"])
        except RecordError:
            return ""

    def _split(self, first: _Abnormality) -> str:
        if first.split == "test":
            return "test"
        frac = hash_fraction("cbis-val", self.cfg.split_seed, first.values["patient_id"])
        return "val" if frac < self.cfg.val_fraction else "train"

    def _image_record(self, rows: list[_Abnormality], dicom_map, log: IngestLog) -> Record:
        first = rows[0]
        key = self._key(first)
        if not key:
            raise RecordError(f"bad key: cannot build a key for {first.values['image file path']!r}")
        pathologies = [r.values["pathology"].upper() for r in rows]
        bad = [p for p in pathologies if p not in PATHOLOGIES]
        if bad:
            raise RecordError(f"label value outside expected set: pathology {_printable(bad[0])} "
                              f"(expected {list(PATHOLOGIES)})")
        image_path = self._resolve(first.values["image file path"], FULL_IMAGE, dicom_map, "image file")
        image, size = read_image(image_path)
        boxes = []
        for r in rows:
            label = "mass" if r.kind == "mass" else "calcification"
            path = self._resolve(r.values["ROI mask file path"], ROI_MASK, dicom_map, "ROI mask")
            boxes.append(mask_to_box(path, size, self.cfg.mask_threshold, label))
        patient = first.values["patient_id"]
        if not patient:
            raise RecordError("missing patient id")
        meta = {
            "patient_id": patient,
            "abnormality_ids": [r.values["abnormality id"] for r in rows],
            "abnormality_types": [r.kind for r in rows],
            "pathologies": pathologies,
            "source_file": first.file, "source_row": first.row,
            "source_rows": [[r.file, r.row] for r in rows],
        }
        return Record(key=key, patient_id=patient, split=self._split(first),
                      labels=np.array([float("MALIGNANT" in pathologies)], dtype=np.float32),
                      image=image, image_size=size, tabular=self._tabular(rows, log),
                      boxes=boxes, meta=meta)

    def _tabular(self, rows: list[_Abnormality], log: IngestLog) -> dict:
        """Image-level metadata; out-of-range values become None and a counted note."""
        def checked(column: str, low: int, high: int) -> list[int]:
            out = []
            for r in rows:
                value = _int_in(r.values.get(column, ""), low, high)
                if value is None:
                    log.note(f"{column} out of range or blank (set to None)")
                else:
                    out.append(value)
            return out

        def joined(column: str, kind: str) -> Optional[str]:
            found = sorted({v for r in rows if r.kind == kind
                            for v in [r.values.get(column, "")] if v.upper() not in ("", "N/A", "NAN")})
            return "|".join(found) if found else None

        def one_of(column: str, allowed: tuple) -> Optional[str]:
            value = rows[0].values.get(column, "").upper()
            if value not in allowed:
                log.note(f"{column} not in {list(allowed)} (set to None)")
                return None
            return value

        density = checked("breast_density", 1, 4)
        if len(set(density)) > 1:
            log.note("breast_density differs within an image (first kept)")
        subtlety = checked("subtlety", 0, 5)
        tab = {
            "breast_density": density[0] if density else None,
            "laterality": one_of("left or right breast", ("LEFT", "RIGHT")),
            "view": one_of("image view", ("CC", "MLO")),
            "n_mass": sum(r.kind == "mass" for r in rows),
            "n_calc": sum(r.kind == "calc" for r in rows),
            "mass_shape": joined("mass shape", "mass"),
            "mass_margins": joined("mass margins", "mass"),
            "calc_type": joined("calc type", "calc"),
            "calc_distribution": joined("calc distribution", "calc"),
            "subtlety_min": min(subtlety) if subtlety else None,
            "subtlety_max": max(subtlety) if subtlety else None,
        }
        if self.cfg.include_assessment:
            assessment = checked("assessment", 0, 5)
            tab["assessment_max"] = max(assessment) if assessment else None
        return tab
