"""Reference rows of ``kdscale eval``: teachers, teacher ensembles and oracle ceilings, evaluated
on the same samples, cohorts, metrics and bootstrap as the students (docs/eval.md).

* :func:`split_samples` reads the split's labels, patient ids, modality presence and
  demographics from the data shards (the JSON and labels members only; images are skipped).
* :func:`teacher_predictions` turns the soft labels the teacher pass wrote (raw logits, T = 1,
  kdscale.data.softlabel_format) into probabilities: sigmoid per label (multilabel). A teacher covers
  the samples it saw (``seen``), an ensemble those any member saw.
* :func:`oracle_predictions` reads ``eval.oracle_scores``: a CSV with column ``key`` and one
  column ``<view>/<label>`` per view (image, ehr, both) and label, holding Bayes-optimal
  probabilities; an empty cell = no score for that sample (it is left out of that view).
* :func:`reference_evaluation` = the students' head metrics on every cohort (and the
  signal-label macros), nothing else.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from kdscale.data.ingest import DataError
from kdscale.data.shard_index import read_index
from kdscale.data.tario import iter_selected
from kdscale.data.softlabel_format import read_soft_split
from kdscale.eval.analysis import COHORT_DEFINITIONS, _selection, cohorts, head_metrics, to_jsonable
from kdscale.eval.predictions import MODALITIES, Predictions

log = logging.getLogger(__name__)

__all__ = ["ORACLE_VIEWS", "split_samples", "teacher_predictions", "oracle_predictions",
           "read_oracle_scores", "reference_evaluation", "check_signal_labels"]

ORACLE_VIEWS = ("image", "ehr", "both")
HEAD = "score"          # the one head of a reference row


# ---------------------------------------------------------------------------------------------
# The split's samples (labels, patients, presence) from the data shards
# ---------------------------------------------------------------------------------------------

def split_samples(shard_dir, split: str) -> tuple[Predictions, dict]:
    """All samples of ``split`` as a head-less :class:`Predictions` (shard order), and
    ``{shard name: [keys]}`` for aligning soft-label shards."""
    shard_dir = Path(shard_dir)
    index = read_index(shard_dir, split)
    names = list(index["label_names"])
    keys, patients, labels, per_shard = [], [], [], {}
    present = {m: [] for m in MODALITIES}
    meta = {"sex": [], "age": [], "ethnicity": []}
    for entry in index["shards"]:
        path = shard_dir / split / entry["name"]
        records = {k: json.loads(v) for k, v in iter_selected(path, "json")}
        label_bytes = dict(iter_selected(path, "labels.npy"))
        shard_keys = list(records)
        missing = [k for k in shard_keys if k not in label_bytes]
        if missing:
            raise DataError(f"{len(missing)} sample(s) without labels.npy, e.g. {missing[0]!r}", file=path)
        for key in shard_keys:
            rec = records[key]
            y = np.load(io.BytesIO(label_bytes[key]), allow_pickle=False).astype(np.float64)
            if y.shape != (len(names),):
                raise DataError(f"sample {key!r}: {y.shape} labels, the index declares {len(names)}",
                                file=path)
            keys.append(key)
            patients.append(str(rec.get("patient_id", "")))
            labels.append(y)
            for m in MODALITIES:
                present[m].append(bool((rec.get("present") or {}).get(m)))
            demo = rec.get("meta") or {}
            meta["sex"].append(str(demo.get("sex") or ""))
            age = demo.get("age")
            meta["age"].append(float(age) if isinstance(age, (int, float)) else float("nan"))
            meta["ethnicity"].append(str(demo.get("ethnicity") or demo.get("race") or ""))
        per_shard[entry["name"]] = shard_keys
    if not keys:
        raise DataError(f"split {split!r} has no samples", file=shard_dir / split)
    base = Predictions(keys=keys, patient_ids=patients, label_names=names,
                       labels=np.stack(labels), heads={},
                       present={m: np.array(v) for m, v in present.items()}, meta=meta)
    return base, per_shard


def _with_head(base: Predictions, probs: np.ndarray, mask: np.ndarray) -> Predictions:
    return Predictions(keys=base.keys, patient_ids=base.patient_ids, label_names=base.label_names,
                       labels=base.labels, heads={HEAD: (probs, mask)}, present=base.present,
                       meta=base.meta, task=base.task)


# ---------------------------------------------------------------------------------------------
# Teachers and ensembles from the soft labels
# ---------------------------------------------------------------------------------------------

def teacher_predictions(soft_dir, split: str, base: Predictions, per_shard: dict) -> dict:
    """``{row name: (Predictions with head "score", info)}`` for every teacher
    (``teacher:<name>``) and ensemble (``ensemble:<name>``) of the soft-label set."""
    index, soft = read_soft_split(soft_dir, split, per_shard, base.label_names)
    logits, seen = soft.logits.astype(np.float32), soft.seen
    ens, ens_seen = soft.ensemble.astype(np.float32), soft.ensemble_seen
    out = {}
    for k, info in enumerate(index["teachers"]):
        probs = _sigmoid(logits[:, k])
        out[f"teacher:{info['name']}"] = (_with_head(base, probs, seen[:, k]), {
            "role": "teacher", "name": info["name"], "modality": info.get("modality"),
            "arch": info.get("arch"), "parameters": info.get("parameters"),
            "val_auroc_macro": info.get("val_auroc_macro"), "checkpoint": info.get("checkpoint")})
    for g, info in enumerate(index.get("ensembles", [])):
        out[f"ensemble:{info['name']}"] = (_with_head(base, _sigmoid(ens[:, g]), ens_seen[:, g]), {
            "role": "ensemble", "name": info["name"], "members": info.get("members"),
            "weights": info.get("weights"), "rule": info.get("rule"), "space": info.get("space")})
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # the teacher pass stores raw logits at T = 1 (data/softlabel_format.py); the teacher's probability
    # is their sigmoid, as in its own validation (kdscale.distill.teachers.UnimodalTask)
    return (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Oracle ceilings
# ---------------------------------------------------------------------------------------------

def read_oracle_scores(path) -> tuple[list[str], dict]:
    """``(keys, {column: float array, NaN = empty})`` of an oracle CSV; ValueError naming the
    file, line or column on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"eval.oracle_scores: {path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or "key" not in rows[0]:
        raise ValueError(f"{path}: the first line must be a header with a 'key' column")
    header = rows[0]
    kcol = header.index("key")
    keys, cols = [], {h: [] for h in header if h != "key"}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}: line {line} has {len(row)} cells, the header {len(header)}")
        keys.append(row[kcol])
        for h, cell in zip(header, row):
            if h == "key":
                continue
            try:
                v = float(cell) if cell.strip() else math.nan
            except ValueError:
                raise ValueError(f"{path}: line {line}, column {h!r}: {cell!r} is not a number") from None
            if not math.isnan(v) and not 0.0 <= v <= 1.0:
                raise ValueError(f"{path}: line {line}, column {h!r}: {v} is not a probability")
            cols[h].append(v)
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: duplicate keys")
    return keys, {h: np.array(v, dtype=np.float64) for h, v in cols.items()}


def oracle_predictions(path, base: Predictions) -> dict:
    """``{"oracle:<view>": (Predictions with head "score", info)}`` for every view with columns
    in the CSV. Every sample of ``base`` must have a row (error naming the file otherwise); a
    view covers the samples with at least one score, and a (sample, label) without a score (an
    empty cell, or no column for the label) is left out of that view's metrics."""
    keys, cols = read_oracle_scores(path)
    views = {}
    for col in cols:
        view, _, label = col.partition("/")
        if view not in ORACLE_VIEWS or not label:
            raise ValueError(f"{path}: column {col!r} is not <view>/<label> with view in {ORACLE_VIEWS}")
        if label not in base.label_names:
            raise ValueError(f"{path}: column {col!r} names a label the data does not have "
                             f"({len(base.label_names)} labels)")
        views.setdefault(view, []).append(label)
    row = {k: i for i, k in enumerate(keys)}
    missing = [k for k in base.keys if k not in row]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {base.n} evaluated samples have no row "
                         f"(e.g. key {missing[0]!r})")
    idx = np.array([row[k] for k in base.keys], dtype=np.int64)
    out = {}
    for view in ORACLE_VIEWS:
        if view not in views:
            continue
        probs = np.full((base.n, len(base.label_names)), np.nan)
        for j, label in enumerate(base.label_names):
            if label in views[view]:
                probs[:, j] = cols[f"{view}/{label}"][idx]
        scored = ~np.isnan(probs)
        covered = scored.any(axis=1)
        # an entry without a score is left out (its label unknown for this row), not imputed
        labels = np.where(scored, base.labels, np.nan)
        probs = np.where(scored, probs, 0.0).astype(np.float32)
        view_base = Predictions(keys=base.keys, patient_ids=base.patient_ids,
                                label_names=base.label_names, labels=labels, heads={},
                                present=base.present, meta=base.meta, task=base.task)
        out[f"oracle:{view}"] = (_with_head(view_base, probs, covered), {
            "role": "oracle", "name": f"oracle:{view}", "view": view, "file": str(path),
            "n_scored": int(covered.sum())})
    if not out:
        raise ValueError(f"{path}: no <view>/<label> column")
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation of a reference row
# ---------------------------------------------------------------------------------------------

def check_signal_labels(signal_labels: Sequence[str], label_names: Sequence[str]) -> list[str]:
    unknown = [s for s in signal_labels if s not in label_names]
    if unknown:
        raise ValueError(f"eval.signal_labels: {unknown} are not labels of the data "
                         f"(labels: {list(label_names)})")
    return list(signal_labels)


def reference_evaluation(preds: Predictions, info: dict, n_boot: int, seed: int,
                         signal_labels: Optional[Sequence[str]] = None) -> dict:
    """``evaluation.json`` of a reference row: head "score" on every cohort it covers, with the
    students' metrics and bootstrap (kdscale.eval.analysis.head_metrics)."""
    masks = cohorts(preds)
    heads = {name: head_metrics(preds, HEAD, mask, n_boot, seed, signal_labels=signal_labels)
             for name, mask in masks.items() if _selection(preds, HEAD, mask).any()}
    if not heads:
        raise ValueError(f"{info.get('name')}: covers no labelled sample of the split")
    return to_jsonable({
        "main_head": HEAD, "task": preds.task, "label_names": preds.label_names, "n": preds.n,
        "n_boot": n_boot, "seed": seed,
        "cohorts": {name: {"n": int(m.sum()), "definition": COHORT_DEFINITIONS[name]}
                    for name, m in masks.items()},
        "heads": {HEAD: heads}, "info": info})
