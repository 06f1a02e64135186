"""MIMIC source: MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR reports + MIMIC-IV EHR as extracted by the
mimic3-benchmarks/MedFuse pipeline (formats: ../shared/docs/method-and-data.md section 3).

Tasks: ``in-hospital-mortality`` and ``phenotyping`` yield one Record per ICU stay of the task
listfiles (EHR always, the paired CXR image + report when the pairing rule finds one);
``radiology`` yields one Record per CXR image that has a CheXpert row (14 labels).
Only CSV metadata is held in memory; images and time series are read one sample at a time.

Partial modalities (EHR tasks). The EHR series is the sample: an unusable series is a counted
skip. The paired image and report are optional in the ``partial`` cohort: a missing or corrupt
image keeps the stay EHR-only (``meta["paired"]`` False, counted note "partial cohort: ...,
stay kept EHR-only"). In the ``paired`` cohort a stay whose image is missing or corrupt cannot
be paired and is a counted skip. In both cohorts an empty or unreadable report keeps the image
without its report (counted note). In the ``radiology`` task the image is the sample (a bad image
is a skip) and an empty or unreadable report is a skip too (the report is its teacher input).
Every read sample is counted, so ``read == kept + skipped`` holds.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

from kdscale.config import ConfigError, path_field
from kdscale.data.ehr import MEDFUSE_DISCRETIZER, Discretizer, load_discretizer_config, read_timeseries_csv
from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.mimic_tables import (IHM_HOURS, IHM_LABELS, PAIRING_RULE_VERSION, R_CLASSES, ImageRef,
                                       ListEntry, Stay, check_stay_subjects, ehr_subject_splits, iter_metadata,
                                       pair_images, pairing_rule, read_all_stays, read_chexpert, read_cxr_split,
                                       read_listfile_header, read_listfiles, read_ms_cxr)
from kdscale.data.record import Box, Record, RecordError, safe_key
from kdscale.data.sources.base import OUTSIDE_ROOT, guarded, read_image, resolve_under_root

EHR_TASKS = ("in-hospital-mortality", "phenotyping")
REPO_ROOT = Path(__file__).resolve().parents[3]


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


def _resolve(path: str) -> Path:
    """Relative paths: the working directory first, then the repository (the default config)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def _binary_labels(raw: list[str]) -> Optional[list[float]]:
    out = []
    for value in raw:
        try:
            number = float(value)
        except ValueError:
            return None
        if number not in (0.0, 1.0):
            return None
        out.append(number)
    return out


def _chexpert_labels(raw: list[str], uncertain: str) -> Optional[list[float]]:
    """CheXpert 1 / 0 / -1 / blank -> 0/1: blank (not mentioned) -> 0 and -1 -> U-Zeros or U-Ones."""
    out = []
    for value in raw:
        if value == "":
            out.append(0.0)
            continue
        try:
            number = float(value)
        except ValueError:
            return None
        if math.isnan(number):
            out.append(0.0)
        elif number == -1.0:
            out.append(1.0 if uncertain == "ones" else 0.0)
        elif number in (0.0, 1.0):
            out.append(number)
        else:
            return None
    return out


class MimicSource:
    name = "mimic"

    def __init__(self, cfg: MimicConfig):
        self.cfg = cfg
        self.cxr_root = Path(cfg.cxr_root)
        self.ehr_root = Path(cfg.ehr_root) if cfg.ehr_root else None
        self.is_ehr_task = cfg.task in EHR_TASKS
        if self.is_ehr_task and self.ehr_root is None:
            raise ConfigError(f"data.mimic.ehr_root is required for task {cfg.task!r}")
        self.discretizer = Discretizer(load_discretizer_config(_resolve(cfg.discretizer)),
                                       timestep=cfg.timestep_hours, max_hours=cfg.max_hours)
        self.rule = pairing_rule(cfg.task, cfg.ihm_window_hours, cfg.view_positions)
        self.splits = ("train", "val", "test") if cfg.val_from_train else ("train", "test")
        if cfg.task == "in-hospital-mortality":
            self.label_names = list(IHM_LABELS)
        elif cfg.task == "phenotyping":
            self.label_names = read_listfile_header(self.ehr_root / cfg.task / "train_listfile.csv")
        else:
            self.label_names = list(R_CLASSES)
        self._ehr_index = None
        self._counts = None

    # -- paths ----------------------------------------------------------------------------------
    def _cxr_csv(self, which: str) -> Path:
        return self.cxr_root / f"mimic-cxr-2.0.0-{which}.csv"

    # Ids from the CSVs become path parts: each path is checked to resolve (symlinks too) under its
    # root, so a crafted id ("../..") cannot make the reader leave the data tree (RecordError).
    @staticmethod
    def _under(root: Path, rel: str, what: str) -> Path:
        resolve_under_root(root, rel, what=what)
        return root / rel

    def _image_path(self, ref: ImageRef) -> Path:
        if self.cfg.resized_image_dir:
            return self._under(Path(self.cfg.resized_image_dir), f"{ref.dicom_id}.jpg", "image")
        return self._under(self.cxr_root, f"files/p{ref.subject_id[:2]}/p{ref.subject_id}/s{ref.study_id}/"
                           f"{ref.dicom_id}.jpg", "image")

    def _report_path(self, ref: ImageRef) -> Path:
        return self._under(Path(self.cfg.reports_root), f"files/p{ref.subject_id[:2]}/p{ref.subject_id}/"
                           f"s{ref.study_id}.txt", "report")

    def _series_path(self, entry: ListEntry) -> Path:
        # mimic3-benchmarks: val stays live in <task>/train/, test stays in <task>/test/
        first, second = ("test", "train") if entry.split == "test" else ("train", "test")
        primary = self._under(self.ehr_root, f"{self.cfg.task}/{first}/{entry.stay}", "time-series")
        other = self._under(self.ehr_root, f"{self.cfg.task}/{second}/{entry.stay}", "time-series")
        return primary if primary.is_file() or not other.is_file() else other

    # -- shared indexes (metadata only) ---------------------------------------------------------
    def _ehr_tables(self):
        if self._ehr_index is None:
            task_dir = self.ehr_root / self.cfg.task
            listed = ("train", "val", "test") if (task_dir / "val_listfile.csv").is_file() else self.splits
            _, entries = read_listfiles(task_dir, listed)
            self._merged_val = 0
            if not self.cfg.val_from_train:
                # no val split: the val listfile's stays are training stays (mimic3-benchmarks split
                # them off train), so they are merged into train, not dropped
                self._merged_val = sum(e.split == "val" for e in entries)
                entries = [dataclasses.replace(e, split="train") if e.split == "val" else e for e in entries]
            stays = read_all_stays(self.ehr_root / "root" / "all_stays.csv")
            check_stay_subjects(entries, stays, self.ehr_root / "root" / "all_stays.csv")
            pairs, stats = pair_images(self._cxr_csv("metadata"), stays, self.cfg.task,
                                       self.cfg.ihm_window_hours, self.cfg.view_positions)
            self._ehr_index = (entries, stays, pairs, stats)
        return self._ehr_index

    def _boxes(self) -> dict:
        return read_ms_cxr(self.cfg.ms_cxr_csv) if self.cfg.ms_cxr_csv else {}

    def _radiology_split(self):
        """Pitfall 1/16: with EHR data the CXR split follows the EHR subject split (others ->
        train), else the official mimic-cxr-2.0.0-split.csv. Returns (ImageRef -> split, name)."""
        if self.ehr_root is not None:
            task_dir = self.ehr_root / "phenotyping"
            if not (task_dir / "test_listfile.csv").is_file():
                task_dir = self.ehr_root / "in-hospital-mortality"
            subjects = ehr_subject_splits(task_dir)
            return (lambda ref: subjects.get(ref.subject_id, "train")), f"ehr-subjects:{task_dir.name}"
        by_dicom = read_cxr_split(self._cxr_csv("split"))
        return (lambda ref: by_dicom.get(ref.dicom_id)), "mimic-cxr-2.0.0-split.csv"

    def cohort_counts(self) -> dict:
        """Samples per split for this task/cohort (metadata pass only; cached)."""
        if self._counts is not None:
            return self._counts
        if self.is_ehr_task:
            entries, _, pairs, stats = self._ehr_tables()
            counts = {s: {"stays": 0, "paired": 0} for s in self.splits}
            for e in entries:
                counts[e.split]["stays"] += 1
                counts[e.split]["paired"] += e.stay_id in pairs
            self._counts = {"splits": counts, "pairing": dict(stats)}
        else:
            chexpert = read_chexpert(self._cxr_csv("chexpert"))
            split_of, split_source = self._radiology_split()
            counts = {"train": 0, "val": 0, "test": 0, "no split": 0, "no CheXpert row": 0}
            for ref in iter_metadata(self._cxr_csv("metadata")):
                if ref.study_id not in chexpert:
                    counts["no CheXpert row"] += 1
                else:
                    counts[split_of(ref) or "no split"] += 1
            self._counts = {"splits": counts, "split_source": split_source}
        return self._counts

    def describe(self) -> dict:
        return {
            "source": self.name, "task": self.cfg.task,
            "cohort": self.cfg.cohort if self.is_ehr_task else "all-images",
            "label_names": self.label_names,
            "ehr_feature_names": self.discretizer.feature_names if self.is_ehr_task else None,
            "discretizer": {"config": self.discretizer.config.path, "timestep_hours": self.cfg.timestep_hours,
                            "impute": "previous", "start_time": "zero", "max_hours": self.cfg.max_hours},
            "pairing_rule": self.rule if self.is_ehr_task else None,
            "pairing_rule_version": PAIRING_RULE_VERSION,
            "uncertain_label": self.cfg.uncertain_label,
            "cohort_counts": self.cohort_counts(),
        }

    # -- streaming ------------------------------------------------------------------------------
    def records(self, log: IngestLog) -> Iterator[Record]:
        gen = self._ehr_records(log) if self.is_ehr_task else self._radiology_records(log)
        return guarded(gen, log, self.name)

    def _ehr_records(self, log: IngestLog) -> Iterator[Record]:
        entries, stays, pairs, stats = self._ehr_tables()
        for reason, n in stats.items():
            log.note(f"pairing: {reason}", n)
        if self._merged_val:
            log.note("val listfile stays merged into train (val_from_train: false)", self._merged_val)
        boxes = self._boxes()
        for entry in entries:
            ref = pairs.get(entry.stay_id)
            if self.cfg.cohort == "paired" and ref is None:
                log.note("paired cohort: stay without a paired image")
                continue
            log.count_read()
            stay = stays.get(entry.stay_id)
            if stay is None:
                log.note("stay not in all_stays.csv (no demographics, no image)")
            record = self._ehr_sample(entry, stay, ref, boxes, log)
            if record is not None:
                yield record

    def _ehr_sample(self, entry: ListEntry, stay: Optional[Stay], ref: Optional[ImageRef], boxes: dict,
                    log: IngestLog) -> Optional[Record]:
        key = safe_key(entry.subject_id, entry.stay_id)
        where = {"key": key, "file": entry.file, "row": entry.row}
        labels = _binary_labels(entry.labels)
        if labels is None:
            log.skip("bad label", f"labels must be 0 or 1 (columns {self.label_names[:3]}...)", **where)
            return None
        hours = IHM_HOURS if self.cfg.task == "in-hospital-mortality" else _positive(entry.period_length)
        if hours is None:
            log.skip("bad period length", "period_length must be a positive number of hours", **where)
            return None
        try:
            series = self._series_path(entry)
        except RecordError as exc:
            log.skip(OUTSIDE_ROOT, str(exc).partition(": ")[2], **where)
            return None
        ehr = self._ehr_matrix(series, hours, key, log)
        if ehr is None:
            return None
        meta = {"task": self.cfg.task, "cohort": self.cfg.cohort, "subject_id": entry.subject_id,
                "stay_id": entry.stay_id, "hadm_id": stay.hadm_id if stay else None, "paired": ref is not None,
                **(stay.demographics if stay else {"sex": None, "age": None, "age_rule": "missing",
                                                    "ethnicity": None}),
                "pairing_rule": self.rule, "source_file": entry.file, "source_row": entry.row,
                "timeseries_file": str(series), "ehr_hours": hours}
        fields: dict = {}
        if ref is not None:
            partial = self.cfg.cohort == "partial"
            try:
                image = self._image_fields(ref, boxes, key, log, report_problem="note")
            except RecordError as exc:         # a path outside its root: never read, the sample is skipped
                log.skip(OUTSIDE_ROOT, str(exc).partition(": ")[2], **where)
                return None
            if image is None and not partial:
                return None                    # paired cohort: a sample that cannot be paired (skip counted)
            if image is None:                  # partial cohort: the stay stays, without the image modality
                meta.update({"paired": False, "unusable_dicom_id": ref.dicom_id})
            else:
                fields, image_meta = image
                meta.update(image_meta)
                if stay is not None and ref.when is not None:
                    meta["image_hours_since_intime"] = (ref.when - stay.intime).total_seconds() / 3600.0
        return self._record(key, entry.subject_id, entry.split, labels, meta, log, ehr=ehr, **fields)

    def _ehr_matrix(self, path: Path, hours: float, key: str, log: IngestLog):
        if not path.is_file():
            log.skip("missing time series", "time-series file not found", key=key, file=path)
            return None
        try:
            events = read_timeseries_csv(path, self.discretizer.config.channel_names)
            if not events:                # header only: nothing observed, not a stay of normal values
                log.skip("empty time series", "the time-series file has no rows", key=key, file=path)
                return None
            ehr, counts = self.discretizer.transform(events, hours)
        except DataError as exc:
            log.skip("unreadable time series", str(exc), key=key, file=path, row=exc.row)
            return None
        except RecordError as exc:        # "implausible series length: ..."
            reason, _, detail = str(exc).partition(": ")
            log.skip(reason, detail, key=key, file=path)
            return None
        if counts["non_finite"]:
            log.skip("non-finite EHR value", f"{counts['non_finite']} NaN/inf value(s)", key=key, file=path)
            return None
        for what in ("unknown_categorical", "non_numeric", "unknown_channel"):
            if counts[what]:
                log.note(f"ehr: {what.replace('_', ' ')} value treated as missing", counts[what])
        return ehr

    def _image_fields(self, ref: ImageRef, boxes: dict, key: str, log: IngestLog, *,
                      report_problem: Literal["skip", "note"] = "skip"):
        """(Record fields, meta) for an image and its report, or None when the image is unusable.

        An unusable image is a recorded skip, except in the partial EHR cohort, where it is a
        counted note (the stay is kept EHR-only). An unusable report is a skip, or with
        ``report_problem="note"`` a counted note (the image is kept without its report). A path
        outside its root is always a skip."""
        path = self._image_path(ref)     # RecordError (outside root): the caller skips the sample
        report_path = self._report_path(ref) if self.cfg.include_reports and self.cfg.reports_root else None
        try:
            data, size = read_image(path)
        except RecordError as exc:
            reason = "missing image" if "not found" in str(exc) else "corrupt image"
            if self.is_ehr_task and self.cfg.cohort == "partial":
                log.note(f"partial cohort: {reason}, stay kept EHR-only")
            else:
                log.skip(reason, str(exc), key=key, file=path)
            return None
        report, report_file = None, None
        if report_path is not None:
            if report_path.is_file():
                problem = None
                try:
                    report = report_path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    problem = ("unreadable report", type(exc).__name__)
                else:
                    if not report.strip():
                        problem = ("empty report", "report file has no text")
                if problem is not None and report_problem == "skip":
                    log.skip(*problem, key=key, file=report_path)
                    return None
                if problem is not None:
                    log.note(f"{problem[0]}, image kept without report")
                    report = None
                else:
                    report_file = str(report_path)
            else:
                log.note("image without a report file")
        scaled = [Box(b.label, b.x * size[0] / w, b.y * size[1] / h, b.w * size[0] / w, b.h * size[1] / h)
                  for b, w, h in boxes.get(ref.dicom_id, [])]
        fields = {"image": data, "image_size": size, "report": report, "boxes": scaled}
        meta = {"dicom_id": ref.dicom_id, "study_id": ref.study_id, "view_position": ref.view,
                "study_datetime": ref.when.isoformat() if ref.when else None, "image_file": str(path),
                "report_file": report_file}
        return fields, meta

    def _radiology_records(self, log: IngestLog) -> Iterator[Record]:
        counts = self.cohort_counts()["splits"]
        if self.ehr_root is not None and (counts["val"] == 0 or counts["test"] == 0):
            raise DataError("the EHR-derived CXR split has no val or no test images: the EHR listfile subject "
                            "ids match no CXR subject (pitfall 1: check id types)", file=self.ehr_root)
        chexpert = read_chexpert(self._cxr_csv("chexpert"))
        split_of, _ = self._radiology_split()
        subjects = self._subject_demographics()
        boxes = self._boxes()
        log.note("radiology: image without a CheXpert row", counts["no CheXpert row"])
        for ref in iter_metadata(self._cxr_csv("metadata")):
            found = chexpert.get(ref.study_id)
            if found is None:
                continue
            raw, chexpert_row = found
            log.count_read()
            key = safe_key(ref.subject_id, ref.study_id, ref.dicom_id)
            labels = _chexpert_labels(raw, self.cfg.uncertain_label)
            if labels is None:
                log.skip("bad label", "CheXpert values must be 1, 0, -1 or blank", key=key,
                         file=self._cxr_csv("chexpert"), row=chexpert_row)
                continue
            split = split_of(ref)
            if split is None:
                log.skip("no split", "dicom_id not in the split CSV", key=key, file=self._cxr_csv("metadata"),
                         row=ref.row)
                continue
            try:
                image = self._image_fields(ref, boxes, key, log)
            except RecordError as exc:         # a path outside its root: never read, the sample is skipped
                log.skip(OUTSIDE_ROOT, str(exc).partition(": ")[2], key=key, file=self._cxr_csv("metadata"),
                         row=ref.row)
                continue
            if image is None:
                continue
            fields, image_meta = image
            meta = {"task": "radiology", "subject_id": ref.subject_id,
                    **self._demographics_at(subjects.get(ref.subject_id), ref), **image_meta,
                    "source_file": str(self._cxr_csv("metadata")), "source_row": ref.row,
                    "labels_row": chexpert_row}
            record = self._record(key, ref.subject_id, split, labels, meta, log, **fields)
            if record is not None:
                yield record

    def _subject_demographics(self) -> dict[str, Stay]:
        """First ICU stay per subject (for sex/ethnicity/age of radiology samples), if EHR is there."""
        if self.ehr_root is None:
            return {}
        first: dict[str, Stay] = {}
        for stay in read_all_stays(self.ehr_root / "root" / "all_stays.csv").values():
            if stay.subject_id not in first or stay.intime < first[stay.subject_id].intime:
                first[stay.subject_id] = stay
        return first

    @staticmethod
    def _demographics_at(stay: Optional[Stay], ref: ImageRef) -> dict:
        if stay is None:
            return {"sex": None, "age": None, "age_rule": "missing", "ethnicity": None}
        demo = dict(stay.demographics)
        if demo.get("age") is not None and ref.when is not None:
            demo["age"] = demo["age"] + (ref.when.year - stay.intime.year)  # age at the study, by year
        return demo

    def _record(self, key, patient, split, labels, meta, log, **fields) -> Optional[Record]:
        try:
            return Record(key=key, patient_id=patient, split=split, labels=labels, meta=meta, **fields)
        except RecordError as exc:
            log.skip("invalid record", str(exc), key=key, file=meta.get("source_file", ""),
                     row=meta.get("source_row"))
            return None


def _positive(text: str) -> Optional[float]:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None
