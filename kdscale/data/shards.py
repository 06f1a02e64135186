"""Records -> WebDataset tar shards (the format is described in shards/README.md).

One pass over the source assigns every sample a ``(split, shard index)`` by stream order: a
split's shard closes when it holds ``max_samples_per_shard`` samples or when the next sample's
source payload would push it past ``max_bytes_per_shard``. The assignment depends only on the
source stream and this config, so work splits without coordination: task ``i`` of ``n`` writes
the shards whose per-split index ``k`` satisfies ``k % n == i``; within a task, ``workers``
processes encode samples (resize, npy, JSON) while the main process streams the source and
writes tars in order.

Restart: a shard is written to a temp file, renamed, then its ``shard-K.stats.json`` is written
LAST and is the done marker; a re-run skips shards that have one. The tars are byte-identical
across runs (fixed headers, fixed member order), so a killed-and-resumed build equals an
uninterrupted one. ``index.json`` per split is written by whichever task finds every shard done
(``kdscale.data.shard_index.finalize_build``).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from kdscale.config import to_dict
from kdscale.data import shard_index
from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.record import MODALITIES, Record, RecordError
from kdscale.data.shard_format import (BUILD_DIR, FORMAT, npy_bytes, shard_is_done, shard_name, stats_path,
                                       write_build_json)
from kdscale.data.shards_config import ShardsConfig
from kdscale.data.sources import build_source
from kdscale.data.tario import TarShardWriter
from kdscale.io.atomic import json_default, publish_atomic
from kdscale.progress import progress_bar, show_progress

log = logging.getLogger(__name__)


def shards_out_dir(cfg) -> Path:
    return Path(cfg.shards.out_dir or Path(cfg.run.out_dir) / "shards")


def shard_config_hash(cfg) -> str:
    """Hash of what decides shard content (data + shards sections, not where they go)."""
    shards = {k: v for k, v in to_dict(cfg.shards).items() if k != "out_dir"}
    # min_kept_fraction decides whether a build passes, not what the shards hold
    data = {k: v for k, v in to_dict(cfg.data).items() if k != "min_kept_fraction"}
    blob = json.dumps({"data": data, "shards": shards}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dumps_json(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no spaces) so identical content gives identical bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default).encode()




_SHARD_TEMP = re.compile(r"^shard-(\d+)\..*\.tmp-\d+$")


def remove_stale_temps(out: Path, task_index: int, num_tasks: int) -> list[str]:
    """Temp files a killed build of THIS task left behind (the caller holds the task's lock, so no
    live process writes them): its source quarantine in ``_build/``, and the ``.tmp-PID`` files
    of the shards it owns (k % num_tasks == task_index). A whole build (one task) also owns the
    shared ``*.tmp-PID`` files (plan, index, summary). Other tasks' temp files are never touched:
    they may be in the middle of writing them. -> the removed paths, relative to ``out``."""
    removed = []
    candidates = list((out / BUILD_DIR).glob(f"source_quarantine.{task_index}.*.tmp"))
    for folder in [out, out / BUILD_DIR, *(d for d in out.iterdir() if d.is_dir() and d.name != BUILD_DIR)] \
            if out.is_dir() else []:
        for path in folder.glob("*.tmp-*"):
            owner = _SHARD_TEMP.match(path.name)
            if owner is not None and int(owner.group(1)) % num_tasks == task_index:
                candidates.append(path)
            elif owner is None and num_tasks == 1:
                candidates.append(path)
    for path in candidates:
        try:
            path.unlink()
            removed.append(str(path.relative_to(out)))
        except FileNotFoundError:
            pass
    if removed:
        log.info("%s: removed %d temp file(s) of an interrupted build: %s", out, len(removed), removed[:5])
    return removed


def payload_bytes(record: Record) -> int:
    """The source payload size used by the byte limit (known before any encoding)."""
    n = len(record.image or b"") + len((record.report or "").encode())
    return n + (record.ehr.nbytes if record.ehr is not None else 0)


# ---------------------------------------------------------------------------------------------
# Encoding one record into tar members (runs in worker processes)
# ---------------------------------------------------------------------------------------------

def _image_format(data: bytes) -> Optional[str]:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def _target_size(size: tuple[int, int], cfg: ShardsConfig) -> tuple[int, int]:
    w, h = size
    side = {"width": w, "shorter": min(w, h), "longer": max(w, h)}.get(cfg.image_resize)
    if side is None or side <= cfg.image_resize_to:  # never upscale
        return w, h
    scale = cfg.image_resize_to / side
    return max(1, round(w * scale)), max(1, round(h * scale))


def encode_image(data: bytes, cfg: ShardsConfig) -> tuple[bytes, str, tuple[int, int], tuple[int, int]]:
    """-> (stored bytes, extension, stored (w, h), source (w, h)). Unchanged bytes when no resize
    applies and the format is JPEG or PNG; other formats are stored as PNG."""
    fmt = _image_format(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            source_size = img.size
            target = _target_size(source_size, cfg)
            if target == source_size and fmt is not None:
                return data, fmt, source_size, source_size
            if fmt == "jpg" and target != source_size:
                img.draft(img.mode, target)  # DCT-domain downscale: decode is 2-8x cheaper
            img.load()
            out = img.resize(target, Image.Resampling.BICUBIC) if img.size != target else img
            buf = io.BytesIO()
            if fmt == "jpg" and out.mode in ("L", "RGB"):
                out.save(buf, format="JPEG", quality=cfg.jpeg_quality)
                return buf.getvalue(), "jpg", target, source_size
            out.save(buf, format="PNG")
            return buf.getvalue(), "png", target, source_size
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's "cannot identify", truncated data
        raise RecordError(f"image cannot be decoded: {type(exc).__name__}: {exc}") from None


def _encode_boxes(record: Record, scale: tuple[float, float]) -> tuple[list[dict], list[tuple[str, bytes]]]:
    boxes, masks = [], []
    sx, sy = scale
    for i, box in enumerate(record.boxes):
        entry = {"label": box.label, "x": box.x * sx, "y": box.y * sy, "w": box.w * sx, "h": box.h * sy,
                 "mask": None}
        if box.mask_png is not None:
            data = box.mask_png
            if (sx, sy) != (1.0, 1.0):
                with Image.open(io.BytesIO(data)) as mask:
                    size = (max(1, round(mask.width * sx)), max(1, round(mask.height * sy)))
                    buf = io.BytesIO()
                    mask.resize(size, Image.Resampling.NEAREST).save(buf, format="PNG")
                    data = buf.getvalue()
            entry["mask"] = f"mask{i}.png"
            masks.append((f"mask{i}.png", data))
        boxes.append(entry)
    return boxes, masks


def encode_record(record: Record, cfg: ShardsConfig, n_labels: int, n_features: Optional[int]) -> dict:
    """One Record -> ``{"key", "members": [(name, bytes)], "stats"}``; RecordError if unusable."""
    if len(record.labels) != n_labels:
        raise RecordError(f"{len(record.labels)} labels, the source declares {n_labels}")
    if record.ehr is not None and n_features is not None and record.ehr.shape[1] != n_features:
        raise RecordError(f"EHR has {record.ehr.shape[1]} features, the source declares {n_features}")
    meta = record.metadata_json()
    members: list[tuple[str, bytes]] = []
    scale = (1.0, 1.0)
    if record.image is not None:
        data, ext, size, source_size = encode_image(record.image, cfg)
        scale = (size[0] / source_size[0], size[1] / source_size[1])
        meta.update(image_size=list(size), source_image_size=list(source_size), image_ext=ext)
        members.append((ext, data))
    boxes, masks = _encode_boxes(record, scale)
    meta["boxes"] = boxes
    meta["ehr_len"] = int(record.ehr.shape[0]) if record.ehr is not None else 0
    if record.ehr is not None:
        members.append(("ehr.npy", npy_bytes(record.ehr.astype(np.float32))))
    if record.report is not None:
        members.append(("txt", record.report.encode("utf-8")))
    if record.tabular is not None:
        members.append(("tabular.json", dumps_json(record.tabular)))
    members.append(("labels.npy", npy_bytes(record.labels.astype(np.float32))))
    members.extend(masks)
    meta["members"] = ["json"] + [ext for ext, _ in members]
    # The JSON goes first: a reader knows which members to expect before it sees them.
    named = [(f"{record.key}.json", dumps_json(meta))] + [(f"{record.key}.{e}", d) for e, d in members]
    stats = {"present": record.present, "labels": record.labels,
             "ehr_len": meta["ehr_len"], "boxes": len(boxes)}
    return {"key": record.key, "members": named, "stats": stats}


def _encode_job(record: Record, cfg: ShardsConfig, n_labels: int, n_features: Optional[int]) -> dict:
    """Worker entry point: a bad sample becomes a skip result instead of an exception."""
    try:
        return encode_record(record, cfg, n_labels, n_features)
    except RecordError as exc:
        return {"key": record.key, "skip": str(exc)}


class _Done:
    """An already computed result (the inline path mimics a Future)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Encoder:
    """Encode inline (workers <= 1) or in a process pool, keeping results in submission order."""

    def __init__(self, workers: int, cfg: ShardsConfig, n_labels: int, n_features: Optional[int]):
        self.args = (cfg, n_labels, n_features)
        self.pool = None
        if workers > 1:
            # spawn: the source may hold threads or open handles that must not be forked.
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.max_inflight = max(4, 8 * workers)

    def submit(self, record: Record):
        if self.pool is None:
            return _Done(_encode_job(record, *self.args))
        return self.pool.submit(_encode_job, record, *self.args)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Assignment and shard files
# ---------------------------------------------------------------------------------------------

class ShardPlanner:
    """Assigns each sample of a split, in stream order, to a shard index of that split."""

    def __init__(self, max_samples: int, max_bytes: int = 0):
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.state: dict[str, list[int]] = {}   # split -> [shard index, samples, payload bytes]

    def assign(self, split: str, nbytes: int) -> tuple[int, bool]:
        """-> (shard index, True if that shard is now full)."""
        st = self.state.get(split)
        if st is None:
            st = self.state[split] = [0, 0, 0]
        elif st[1] >= self.max_samples or (self.max_bytes and st[2] + nbytes > self.max_bytes):
            st[0], st[1], st[2] = st[0] + 1, 0, 0
        st[1] += 1
        st[2] += nbytes
        return st[0], st[1] >= self.max_samples

    def shard_counts(self) -> dict[str, int]:
        return {split: st[0] + 1 for split, st in sorted(self.state.items())}


def presence_pattern(present: dict) -> str:
    """The modalities a sample has, as a key of per-shard ``presence_patterns``: "image+ehr"
    (MODALITIES order), "none" for a sample with none."""
    return "+".join(m for m in MODALITIES if present.get(m)) or "none"


class _ShardStats:
    def __init__(self, n_labels: int):
        self.count, self.boxes, self.ehr_rows, self.ehr_max = 0, 0, 0, 0
        self.positives = np.zeros(n_labels, np.int64)
        self.known = np.zeros(n_labels, np.int64)
        self.present = dict.fromkeys(MODALITIES, 0)
        self.patterns: dict[str, int] = {}    # "image+ehr" -> samples with exactly those modalities
        self.paired_image_ehr = 0
        self.skipped: list[dict] = []
        self.first_key = self.last_key = None

    def add(self, key: str, stats: dict) -> None:
        self.count += 1
        self.first_key = self.first_key or key
        self.last_key = key
        labels = stats["labels"]
        self.positives += labels == 1
        self.known += ~np.isnan(labels)
        for modality, present in stats["present"].items():
            self.present[modality] += int(present)
        pattern = presence_pattern(stats["present"])
        self.patterns[pattern] = self.patterns.get(pattern, 0) + 1
        self.paired_image_ehr += int(stats["present"]["image"] and stats["present"]["ehr"])
        self.ehr_rows += stats["ehr_len"]
        self.ehr_max = max(self.ehr_max, stats["ehr_len"])
        self.boxes += stats["boxes"]

    def to_json(self) -> dict:
        return {"count": self.count, "label_positives": self.positives.tolist(),
                "label_known": self.known.tolist(), "presence": self.present,
                "presence_patterns": dict(sorted(self.patterns.items())),
                "paired_image_ehr": self.paired_image_ehr, "ehr_rows": self.ehr_rows,
                "ehr_max_len": self.ehr_max, "boxes": self.boxes, "skipped": self.skipped,
                "first_key": self.first_key, "last_key": self.last_key}


class ShardSink:
    """Owns the shards of one task: decides which to write, writes members, commits markers."""

    def __init__(self, out: Path, config_hash: str, n_labels: int, task_index: int = 0, num_tasks: int = 1):
        self.out, self.config_hash, self.n_labels = out, config_hash, n_labels
        self.task_index, self.num_tasks = task_index, num_tasks
        self._wanted: dict[tuple[str, int], bool] = {}
        self._open: dict[tuple[str, int], tuple[TarShardWriter, _ShardStats]] = {}
        self.written: list[tuple[str, int]] = []
        self.skipped_done = 0

    def wants(self, split: str, index: int) -> bool:
        sid = (split, index)
        if sid not in self._wanted:
            owned = index % self.num_tasks == self.task_index
            done = owned and shard_is_done(self.out / split, index, self.config_hash)
            self.skipped_done += int(done)
            self._wanted[sid] = owned and not done
        return self._wanted[sid]

    def add(self, split: str, index: int, result: dict) -> None:
        sid = (split, index)
        if sid not in self._open:
            (self.out / split).mkdir(parents=True, exist_ok=True)
            self._open[sid] = (TarShardWriter(self.out / split / shard_name(index)), _ShardStats(self.n_labels))
        writer, stats = self._open[sid]
        if "skip" in result:
            stats.skipped.append({"key": result["key"], "reason": result["skip"]})
            return
        for name, data in result["members"]:
            writer.add(name, data)
        stats.add(result["key"], result["stats"])

    def close(self, split: str, index: int) -> None:
        writer, stats = self._open.pop((split, index))
        info = writer.commit()
        record = {"split": split, "shard": shard_name(index), "index": index,
                  "shard_config_hash": self.config_hash, **info, **stats.to_json()}
        write_build_json(stats_path(self.out / split, index), record)  # the done marker, LAST
        self.written.append((split, index))

    def abort(self) -> None:
        for writer, _ in self._open.values():
            writer.abort()
        self._open.clear()


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------

def _drain(pending: deque, sink: ShardSink, keep: int) -> None:
    while len(pending) > keep:
        kind, split, index, future = pending.popleft()
        if kind == "sample":
            sink.add(split, index, future.result())
        else:
            sink.close(split, index)


def stream_to_shards(source, ingest: IngestLog, cfg: ShardsConfig, sink: ShardSink, encoder: _Encoder,
                     progress=None) -> dict[str, int]:
    """Stream the source once; write the shards ``sink`` wants. -> shard count per split."""
    planner = ShardPlanner(cfg.max_samples_per_shard, cfg.max_bytes_per_shard)
    pending: deque = deque()   # ("sample"|"close", split, index, future) in stream order
    current: dict[str, int] = {}  # split -> the shard of that split this task has open
    for record in source.records(ingest):
        index, full = planner.assign(record.split, payload_bytes(record))
        previous = current.get(record.split)
        if previous is not None and previous != index:
            pending.append(("close", record.split, current.pop(record.split), None))
        if sink.wants(record.split, index):
            current[record.split] = index
            pending.append(("sample", record.split, index, encoder.submit(record)))
            if full:
                pending.append(("close", record.split, current.pop(record.split), None))
        _drain(pending, sink, encoder.max_inflight)
        if progress is not None:
            progress.update(1)
    for split, index in sorted(current.items()):
        pending.append(("close", split, index, None))
    _drain(pending, sink, 0)
    return planner.shard_counts()


def _source_facts(source) -> tuple[dict, list[str], Optional[list[str]]]:
    describe = source.describe() if hasattr(source, "describe") else {}
    labels = list(getattr(source, "label_names", None) or describe.get("label_names") or [])
    features = describe.get("ehr_feature_names")
    return describe, labels, (list(features) if features is not None else None)


def build_shards(cfg, workers: int = 1, task_index: int = 0, num_tasks: int = 1, *,
                 source=None, progress: bool = False) -> dict:
    """Write the shards of ``cfg.data``'s source under ``cfg.shards.out_dir`` (see module doc).

    ``source`` replaces ``build_source(cfg.data)`` (tests, benchmarks). Returns the build
    summary; ``summary["complete"]`` says whether every shard exists and index.json was written.
    """
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is not in 0..{num_tasks - 1}")
    out = shards_out_dir(cfg)
    chash = shard_config_hash(cfg)
    (out / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, task_index, num_tasks)
    plan = shard_index.read_plan(out, chash)
    if plan is not None and shard_index.all_shards_done(out, plan, chash):
        done = shard_index.finished_summary(out, chash)
        if done is not None:
            log.info("shards in %s are complete (%s)", out, done["line"])
            return done
        return shard_index.finalize_build(out, cfg, chash)
    if source is None:
        source = build_source(cfg.data)
    start = time.time()
    summary = _run_task(cfg, source, out, chash, workers, task_index, num_tasks, progress)
    plan = shard_index.read_plan(out, chash)
    if shard_index.all_shards_done(out, plan, chash):
        summary = {**shard_index.finalize_build(out, cfg, chash), "task": summary}
    else:
        summary = {"complete": False, "out_dir": str(out), "task": summary}
        log.info("task %d/%d done; index.json waits for the other tasks' shards", task_index, num_tasks)
    summary["elapsed_s"] = round(time.time() - start, 3)
    return summary


def _run_task(cfg, source, out: Path, chash: str, workers: int, task_index: int, num_tasks: int,
              progress: bool) -> dict:
    describe, label_names, features = _source_facts(source)
    tmp_quarantine = out / BUILD_DIR / f"source_quarantine.{task_index}.{os.getpid()}.tmp"
    ingest = IngestLog(getattr(source, "name", "source"), on_bad_sample=cfg.data.on_bad_sample,
                       quarantine_path=tmp_quarantine)
    sink = ShardSink(out, chash, len(label_names), task_index, num_tasks)
    encoder = _Encoder(workers, cfg.shards, len(label_names), len(features) if features else None)
    bar = progress_bar(f"shards task {task_index}/{num_tasks}", unit="sample") if show_progress(progress) else None
    try:
        counts = stream_to_shards(source, ingest, cfg.shards, sink, encoder, bar)
    except BaseException:
        sink.abort()
        tmp_quarantine.unlink(missing_ok=True)
        raise
    finally:
        encoder.close()
        ingest.close()
        if bar is not None:
            bar.close()
    publish_atomic(tmp_quarantine, out / BUILD_DIR / "source_quarantine.jsonl")
    shard_index.write_plan(out, {"format": FORMAT, "shard_config_hash": chash, "shards": counts,
                                 "label_names": label_names, "ehr_feature_names": features,
                                 "source": describe, "ingest": ingest.summary()})
    return {"task_index": task_index, "num_tasks": num_tasks, "written": len(sink.written),
            "already_done": sink.skipped_done, "ingest": ingest.summary()}
