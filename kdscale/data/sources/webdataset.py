"""A user's existing WebDataset corpus (tar shards written by ``wds.ShardWriter`` or any other
WebDataset tool) as a kdscale source.

The corpus is read with the ``webdataset`` library itself, one shard at a time (so an unreadable
shard is named), and each sample becomes a Record; ``kdscale shards`` then writes kdscale's own
shards from it (index, presence counts, EHR normalizer, exact epochs). Which member holds what is
configured, since WebDataset fixes no schema:

    data:
      source: webdataset
      webdataset:
        root: /data/my-corpus                   # every shard must lie under it
        splits: {train: "train-{000000..000009}.tar", val: "val-000000.tar", test: "test-*.tar"}
        label_names: [benign, malignant]
        labels_from: cls                        # cls: an integer class index (or "0,2" multi-hot)
                                                # json: data.<labels_key> in the JSON member
        patient_key: patient_id                 # in the JSON member; "" = each sample its own patient
        image_exts: [jpg, jpeg, png]            # the first present is the image
        report_ext: txt                         # "" = no report member
        tabular_ext: ""                         # e.g. tabular.json: a JSON object of fields

A sample whose members cannot be interpreted (no label, a label outside ``label_names``, an
undecodable image, a JSON member that is not an object) is a counted skip with its reason.
"""
from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Iterator

import braceexpand
import numpy as np
import webdataset as wds

from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.record import Record, RecordError, safe_key
from kdscale.data.sources.base import decoded_image_size, guarded
from kdscale.data.sources.webdataset_config import WebDatasetConfig  # noqa: F401  (re-exported)


def expand_pattern(root: Path, pattern: str) -> list[Path]:
    """Shard files of one split, sorted: WebDataset's {000..009} braces, then shell globs. Every
    file must exist and lie under ``root`` (symlinks resolved); anything else is a DataError."""
    root = root.resolve()
    paths: list[Path] = []
    for part in braceexpand.braceexpand(pattern):
        candidate = Path(part) if Path(part).is_absolute() else root / part
        matches = sorted(glob.glob(str(candidate))) if glob.has_magic(str(candidate)) else [str(candidate)]
        if not matches:
            raise DataError(f"shard pattern {pattern!r} matches no file", file=candidate)
        for match in matches:
            path = Path(match).resolve()
            if not path.is_relative_to(root):
                raise DataError(f"shard pattern {pattern!r} leaves the corpus root {root}", file=match)
            if not path.is_file():
                raise DataError("shard file not found", file=match)
            paths.append(path)
    return paths


class WebDatasetSource:
    name = "webdataset"

    def __init__(self, cfg: WebDatasetConfig):
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.label_names = list(cfg.label_names)
        self.shards = {split: expand_pattern(self.root, pattern) for split, pattern in cfg.splits.items()}

    def describe(self) -> dict:
        cfg = self.cfg
        return {
            "name": self.name, "root": str(self.root), "label_names": self.label_names,
            "shards": {split: len(paths) for split, paths in self.shards.items()},
            "labels_from": cfg.labels_from if cfg.labels_from == "cls" else f"json:{cfg.labels_key}",
            "patients": (f"json:{cfg.patient_key}" if cfg.patient_key
                         else "none given: every sample is its own patient (splits cannot be checked for leakage)"),
            "ehr_feature_names": None,
        }

    def records(self, log: IngestLog) -> Iterator[Record]:
        return guarded(self._stream(log), log, self.name)

    def _stream(self, log: IngestLog) -> Iterator[Record]:
        for split, paths in self.shards.items():
            for path in paths:
                dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False,
                                         handler=wds.reraise_exception)
                try:
                    for sample in dataset:
                        log.count_read()
                        key = ""
                        try:
                            key = safe_key(sample["__key__"])
                            record = self._record(sample, key, split)
                        except RecordError as exc:
                            reason, _, detail = str(exc).partition(": ")
                            log.skip(reason, detail, key=key, file=path)
                            continue
                        yield record
                except (ValueError, OSError, EOFError) as exc:
                    if isinstance(exc, DataError):
                        raise
                    raise DataError(f"unreadable WebDataset shard ({type(exc).__name__}: {exc})", file=path) from None

    def _record(self, sample: dict, key: str, split: str) -> Record:
        cfg = self.cfg
        info = self._json(sample) if cfg.json_ext in sample else {}
        if cfg.labels_from == "cls":
            labels = self._cls_labels(sample)
        else:
            labels = self._json_labels(info)
        patient = str(info.get(cfg.patient_key, "")) if cfg.patient_key else key
        if not patient:
            raise RecordError(f"no patient id: the JSON member has no {cfg.patient_key!r}")
        image, size = self._image(sample)
        report = None
        if cfg.report_ext and cfg.report_ext in sample:
            try:
                report = sample[cfg.report_ext].decode("utf-8")
            except UnicodeDecodeError:
                raise RecordError(f"report not UTF-8: member .{cfg.report_ext}") from None
            if not report.strip():
                raise RecordError(f"empty report: member .{cfg.report_ext}")
        tabular = None
        if cfg.tabular_ext and cfg.tabular_ext in sample:
            tabular = _json_object(sample[cfg.tabular_ext], cfg.tabular_ext)
            bad = [k for k, v in tabular.items() if not (v is None or isinstance(v, (str, int, float)))]
            if bad:
                raise RecordError(f"tabular fields must be numbers or strings: {sorted(bad)[:5]}")
        if image is None and report is None and tabular is None:
            raise RecordError("no usable modality: the sample has no image, report or tabular member")
        return Record(key=key, patient_id=patient, split=split, labels=labels, image=image, image_size=size,
                      report=report, tabular=tabular,
                      meta={"source_key": str(sample["__key__"]), "source_file": Path(str(sample["__url__"])).name})

    def _json(self, sample: dict) -> dict:
        return _json_object(sample[self.cfg.json_ext], self.cfg.json_ext)

    def _cls_labels(self, sample: dict) -> np.ndarray:
        ext = self.cfg.cls_ext
        if ext not in sample:
            raise RecordError(f"no label: member .{ext} is missing")
        text = sample[ext].decode("utf-8", errors="replace").strip()
        try:
            indices = [int(part) for part in text.split(",")]
        except ValueError:
            raise RecordError(f"label not an integer class index: member .{ext}") from None
        out = np.zeros(len(self.label_names), np.float32)
        for index in indices:
            if not 0 <= index < len(self.label_names):
                raise RecordError(f"class index out of range: {index} (labels 0..{len(self.label_names) - 1})")
            out[index] = 1.0
        return out

    def _json_labels(self, info: dict) -> np.ndarray:
        key, names = self.cfg.labels_key, self.label_names
        if key not in info:
            raise RecordError(f"no label: the JSON member has no {key!r}")
        value = info[key]
        if isinstance(value, dict):
            unknown = set(value) - set(names)
            if unknown:
                raise RecordError(f"label names outside label_names: {sorted(unknown)[:5]}")
            value = [value.get(name) for name in names]
        if not isinstance(value, list) or len(value) != len(names):
            raise RecordError(f"labels must be a list of {len(names)} values or a mapping by label name")
        out = np.full(len(names), np.nan, np.float32)
        for i, v in enumerate(value):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            if v not in (0, 1) or isinstance(v, str):
                raise RecordError(f"label value not 0, 1 or null: label {names[i]!r}")
            out[i] = float(v)
        return out

    def _image(self, sample: dict) -> tuple[bytes | None, tuple[int, int] | None]:
        ext = next((e for e in self.cfg.image_exts if e in sample), None)
        if ext is None:
            return None, None
        return sample[ext], decoded_image_size(sample[ext], f"member .{ext}")


def _json_object(data: bytes, ext: str) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise RecordError(f"member .{ext} is not valid JSON") from None
    if not isinstance(value, dict):
        raise RecordError(f"member .{ext} is not a JSON object")
    return value
