"""MIMIC metadata tables and the CXR <-> ICU-stay pairing (method-and-data.md 3.1, 3.3, 3.6).

Everything here reads CSV metadata only (no images, no time series), keeps compact in-memory
indexes, and fails with a DataError naming the file, row and column. Ids are normalised to
canonical decimal strings everywhere ("10000032", never 10000032 or "10000032.0"), which is
what MedFuse's create_split.py got wrong (pitfall 1: int vs str ids, nothing matched).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator, Optional, Sequence

from kdscale.data.ingest import DataError
from kdscale.data.record import Box
from kdscale.data.sources.base import LeakageError, open_csv

R_CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
             "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
             "Pneumonia", "Pneumothorax", "Support Devices"]
IHM_LABELS = ["In-hospital mortality"]
IHM_HOURS = 48.0             # the IHM task's EHR window (the listfile's period_length is 0)
PAIRING_RULE_VERSION = 1     # bump when the pairing logic changes; it is recorded in every Record
LISTFILE_SPLITS = ("train", "val", "test")
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"]
STAY_COLUMNS = ["subject_id", "hadm_id", "stay_id", "intime", "outtime"]


def norm_id(value: object) -> Optional[str]:
    """Canonical id string: '10000032', '10000032.0', 10000032 -> '10000032'; blank/bad -> None."""
    text = str(value if value is not None else "").strip()
    if not text:
        return None
    if text.isdigit():
        return str(int(text))
    try:
        number = float(text)
    except ValueError:
        return None
    return str(int(number)) if number.is_integer() and number >= 0 else None


def parse_datetime(text: str) -> Optional[datetime]:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def study_datetime(date: str, time: str) -> Optional[datetime]:
    """MedFuse's StudyDateTime: StudyDate (YYYYMMDD) + StudyTime as f'{int(float(x)):06}', so
    fractional seconds are dropped (pitfall 11: ties are then broken on dicom_id)."""
    try:
        day = f"{int(float(date)):08}"
        clock = f"{int(float(time)):06}"
        return datetime.strptime(f"{day} {clock}", "%Y%m%d %H%M%S")
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# ICU stays
# ---------------------------------------------------------------------------------------------

@dataclass
class Stay:
    subject_id: str
    hadm_id: str
    stay_id: str
    intime: datetime
    outtime: datetime
    row: int
    demographics: dict = field(default_factory=dict)


def _age(row: dict) -> tuple[Optional[float], str]:
    """Pitfall 9: true age = anchor_age + (year(admittime) - anchor_year) when anchor_year is
    there; else MedFuse's rule (the extracted 'age' column = anchor_age, negative -> 90)."""
    anchor_age = _float(row.get("anchor_age"))
    anchor_year = _float(row.get("anchor_year"))
    admit = parse_datetime(row.get("admittime", "")) or parse_datetime(row.get("intime", ""))
    if anchor_age is not None and anchor_year is not None and admit is not None:
        return anchor_age + (admit.year - anchor_year), "anchor_year"
    age = _float(row.get("age"))
    if age is None:
        age = anchor_age
    if age is None:
        return None, "missing"
    return (90.0 if age < 0 else age), "medfuse_anchor_age"


def _float(text: object) -> Optional[float]:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN -> None


def read_all_stays(path: str | os.PathLike) -> dict[str, Stay]:
    """root/all_stays.csv -> {stay_id: Stay}. Bad ids or times are a DataError (row, column)."""
    stays: dict[str, Stay] = {}
    for i, row in open_csv(path, required=STAY_COLUMNS, what="all_stays"):
        ids = {}
        for column in ("subject_id", "hadm_id", "stay_id"):
            ids[column] = norm_id(row[column])
            if ids[column] is None:
                raise DataError("bad id", file=path, row=i, column=column)
        times = {}
        for column in ("intime", "outtime"):
            times[column] = parse_datetime(row[column])
            if times[column] is None:
                raise DataError("bad date-time (expected YYYY-MM-DD HH:MM:SS)", file=path, row=i, column=column)
        if ids["stay_id"] in stays:
            raise DataError(f"stay_id {ids['stay_id']} listed twice", file=path, row=i, column="stay_id")
        age, age_rule = _age(row)
        demo = {"sex": (row.get("gender") or "").strip() or None,
                "ethnicity": (row.get("ethnicity") or row.get("race") or "").strip() or None,
                "age": age, "age_rule": age_rule}
        stays[ids["stay_id"]] = Stay(ids["subject_id"], ids["hadm_id"], ids["stay_id"], times["intime"],
                                     times["outtime"], i, demo)
    return stays


# ---------------------------------------------------------------------------------------------
# Task listfiles
# ---------------------------------------------------------------------------------------------

@dataclass
class ListEntry:
    stay: str              # "<subject>_episode<k>_timeseries.csv"
    subject_id: str
    stay_id: str
    period_length: str
    labels: list[str]      # raw strings, validated per sample by the source
    split: str
    file: str
    row: int


def _check_subject_split(split_of: dict[str, tuple[str, str]], subject: str, split: str, path: Path,
                         row: int) -> None:
    """Listfile splits must be patient-level: a subject seen in two splits is a LeakageError
    naming the subject and both listfiles (with rows)."""
    seen = split_of.setdefault(subject, (split, f"{path}:{row}"))
    if seen[0] != split:
        raise LeakageError(f"patient {subject} is in two splits ({seen[0]!r} at {seen[1]} and "
                           f"{split!r}); listfile splits must be patient-level", file=path, row=row)


def read_listfiles(task_dir: str | os.PathLike, splits: Sequence[str] = LISTFILE_SPLITS
                   ) -> tuple[list[str], list[ListEntry]]:
    """{train,val,test}_listfile.csv -> (label names in listfile order, entries). The subject is
    the stay file name's prefix (as MedFuse). A subject in two splits is a LeakageError."""
    task_dir = Path(task_dir)
    label_names: Optional[list[str]] = None
    entries: list[ListEntry] = []
    split_of: dict[str, tuple[str, str]] = {}
    stay_at: dict[str, tuple[str, str, str]] = {}   # stay_id -> (subject, listfile, row)
    for split in splits:
        path = task_dir / f"{split}_listfile.csv"
        rows = open_csv(path, required=["stay", "period_length", "stay_id"], what=f"{split} listfile")
        for i, row in rows:
            names = [c for c in row if c not in ("stay", "period_length", "stay_id")]
            if label_names is None:
                label_names = names
                if not names:
                    raise DataError("listfile has no label columns", file=path, row=1)
            elif names != label_names:
                raise DataError(f"label columns differ from the other listfiles ({label_names})", file=path, row=1)
            stay = (row["stay"] or "").strip()
            subject, stay_id = norm_id(stay.split("_")[0]), norm_id(row["stay_id"])
            if subject is None or not stay.endswith(".csv"):
                raise DataError("'stay' must look like <subject>_episode<k>_timeseries.csv", file=path, row=i,
                                column="stay")
            if stay_id is None:
                raise DataError("bad stay_id", file=path, row=i, column="stay_id")
            first = stay_at.setdefault(stay_id, (subject, str(path), str(i)))
            if first != (subject, str(path), str(i)) and (first[0] != subject or first[1] != str(path)):
                # the same file listing a stay twice for one subject is a counted duplicate key later
                raise DataError(f"stay_id {stay_id} is listed twice: subject {first[0]} at {first[1]}:{first[2]} "
                                f"and subject {subject} here", file=path, row=i, column="stay_id")
            _check_subject_split(split_of, subject, split, path, i)
            entries.append(ListEntry(stay, subject, stay_id, (row["period_length"] or "").strip(),
                                     [(row[n] or "").strip() for n in label_names], split, str(path), i))
    return label_names or [], entries


def check_stay_subjects(entries: Sequence[ListEntry], stays: dict[str, "Stay"], stays_path) -> None:
    """A listfile stay_id must belong to the listfile row's subject (the stay file's prefix):
    otherwise the EHR series of one patient would be paired with another patient's films."""
    for e in entries:
        stay = stays.get(e.stay_id)
        if stay is not None and stay.subject_id != e.subject_id:
            raise DataError(f"stay_id {e.stay_id} belongs to subject {stay.subject_id} in {stays_path} "
                            f"(row {stay.row}) but the listfile row is for subject {e.subject_id}",
                            file=e.file, row=e.row, column="stay_id")


def read_listfile_header(path: str | os.PathLike) -> list[str]:
    rows = open_csv(path, required=["stay", "period_length", "stay_id"], what="listfile")
    try:
        _, row = next(rows)
    except StopIteration:
        raise DataError("listfile has no rows", file=path) from None
    finally:
        rows.close()
    return [c for c in row if c not in ("stay", "period_length", "stay_id")]


def ehr_subject_splits(task_dir: str | os.PathLike) -> dict[str, str]:
    """MedFuse create_split.py, fixed: subjects of val/test listfiles -> val/test (ids cast)."""
    split_of: dict[str, tuple[str, str]] = {}
    for split in ("val", "test"):
        path = Path(task_dir) / f"{split}_listfile.csv"
        for i, row in open_csv(path, required=["stay"], what="listfile"):
            subject = norm_id((row["stay"] or "").split("_")[0])
            if subject is not None:
                _check_subject_split(split_of, subject, split, path, i)   # val + test: LeakageError
    return {subject: split for subject, (split, _) in split_of.items()}


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR tables
# ---------------------------------------------------------------------------------------------

@dataclass
class ImageRef:
    dicom_id: str
    subject_id: str
    study_id: str
    view: str
    when: Optional[datetime]
    row: int


def iter_metadata(path: str | os.PathLike) -> Iterator[ImageRef]:
    """Stream mimic-cxr-2.0.0-metadata.csv rows (one per image)."""
    for i, row in open_csv(path, required=METADATA_COLUMNS, what="CXR metadata"):
        dicom = (row["dicom_id"] or "").strip()
        subject, study = norm_id(row["subject_id"]), norm_id(row["study_id"])
        if not dicom or subject is None or study is None:
            bad = "dicom_id" if not dicom else ("subject_id" if subject is None else "study_id")
            raise DataError("bad id", file=path, row=i, column=bad)
        yield ImageRef(dicom, subject, study, (row["ViewPosition"] or "").strip(),
                       study_datetime(row["StudyDate"], row["StudyTime"]), i)


def read_chexpert(path: str | os.PathLike) -> dict[str, tuple[list[str], int]]:
    """study_id -> (raw values of the 14 labels in R_CLASSES order, row)."""
    table: dict[str, tuple[list[str], int]] = {}
    for i, row in open_csv(path, required=["study_id", *R_CLASSES], what="CheXpert labels"):
        study = norm_id(row["study_id"])
        if study is None:
            raise DataError("bad id", file=path, row=i, column="study_id")
        if study in table:   # one row per study: a second one would silently replace the labels
            raise DataError(f"study_id {study} listed twice (first at row {table[study][1]})", file=path, row=i,
                            column="study_id")
        table[study] = ([(row[c] or "").strip() for c in R_CLASSES], i)
    return table


def read_cxr_split(path: str | os.PathLike) -> dict[str, str]:
    """mimic-cxr-2.0.0-split.csv -> {dicom_id: train|val|test} ('validate' -> 'val')."""
    names = {"train": "train", "validate": "val", "val": "val", "test": "test"}
    splits: dict[str, str] = {}
    rows: dict[str, int] = {}
    for i, row in open_csv(path, required=["dicom_id", "split"], what="CXR split"):
        split = names.get((row["split"] or "").strip())
        if split is None:
            raise DataError("split must be train/validate/test", file=path, row=i, column="split")
        dicom = (row["dicom_id"] or "").strip()
        if not dicom:
            raise DataError("blank dicom_id", file=path, row=i, column="dicom_id")
        if dicom in rows:    # one row per image: a second one would silently move it to another split
            raise DataError(f"dicom_id {dicom} listed twice (first at row {rows[dicom]})", file=path, row=i,
                            column="dicom_id")
        splits[dicom], rows[dicom] = split, i
    return splits


MS_CXR_COLUMNS = ["dicom_id", "category_name", "x", "y", "w", "h", "image_width", "image_height"]


def read_ms_cxr(path: str | os.PathLike) -> dict[str, list[tuple[Box, float, float]]]:
    """MS-CXR local alignment CSV -> {dicom_id: [(Box in original pixels, image_w, image_h)]}."""
    boxes: dict[str, list] = {}
    for i, row in open_csv(path, required=MS_CXR_COLUMNS, what="MS-CXR"):
        values = {}
        for column in ("x", "y", "w", "h", "image_width", "image_height"):
            values[column] = _float(row[column])
            if values[column] is None:
                raise DataError("not a number", file=path, row=i, column=column)
        if values["w"] <= 0 or values["h"] <= 0 or values["image_width"] <= 0 or values["image_height"] <= 0:
            raise DataError("box and image sizes must be positive", file=path, row=i, column="w")
        box = Box(label=(row["category_name"] or "").strip(), x=values["x"], y=values["y"], w=values["w"],
                  h=values["h"])
        boxes.setdefault((row["dicom_id"] or "").strip(), []).append(
            (box, values["image_width"], values["image_height"]))
    return boxes


# ---------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------

def pairing_rule(task: str, ihm_window_hours: float, views: Sequence[str]) -> str:
    """A versioned, human-readable statement of the pairing rule (pitfall 8)."""
    if task == "in-hospital-mortality" and ihm_window_hours > 0:
        end = f"intime+{ihm_window_hours:g}h"
    else:
        end = "outtime"
    return (f"v{PAIRING_RULE_VERSION}: intime<=StudyDateTime<={end}; ViewPosition in "
            f"{'/'.join(views)}; latest per stay, tie-break max dicom_id")


def pair_images(metadata_path: str | os.PathLike, stays: dict[str, Stay], task: str,
                ihm_window_hours: float, views: Sequence[str]) -> tuple[dict[str, ImageRef], Counter]:
    """MedFuse loadmetadata(), streamed: per stay, the latest image with intime <= t <= end and
    an allowed view; same-time images tie-break on dicom_id. Returns ({stay_id: image}, counts).

    The counts say why images did not pair (pitfall 11: the view filter is logged)."""
    by_subject: dict[str, list[Stay]] = {}
    for stay in stays.values():
        by_subject.setdefault(stay.subject_id, []).append(stay)
    window = timedelta(hours=ihm_window_hours) if (task == "in-hospital-mortality" and ihm_window_hours > 0) else None
    allowed = set(views)
    best: dict[str, ImageRef] = {}
    stats: Counter = Counter()
    for image in iter_metadata(metadata_path):
        stats["images"] += 1
        candidates = by_subject.get(image.subject_id)
        if not candidates:
            stats["subject without ICU stay"] += 1
            continue
        if image.when is None:
            stats["bad StudyDate/StudyTime"] += 1
            continue
        in_window = [s for s in candidates
                     if s.intime <= image.when <= (s.intime + window if window else s.outtime)]
        if not in_window:
            stats["outside the stay window"] += 1
            continue
        if image.view not in allowed:
            stats[f"view not in {'/'.join(views)}"] += 1
            continue
        stats["in window, allowed view"] += 1
        for stay in in_window:
            current = best.get(stay.stay_id)
            if current is None or (image.when, image.dicom_id) > (current.when, current.dicom_id):
                best[stay.stay_id] = image
    stats["stays with an image"] = len(best)
    return best, stats
