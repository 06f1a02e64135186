"""Predictions of one model on one split: the hand-over between running a model and analysing it.

``kdscale eval`` runs a trained student and writes a :class:`Predictions` with
:func:`write_predictions`; everything downstream (``kdscale.eval.analysis``, ``plots``,
``report``) starts from :func:`read_predictions`. The file is a CSV plus a JSON sidecar
(``<path>.json``); see docs/eval.md for the full format.

CSV columns, in this order (one row per sample)::

    key, patient_id, sex, age, ethnicity,
    present:image, present:ehr, present:report, present:tabular,   # 1 / 0 / empty (not recorded)
    y:<label> ...                                                  # 0 / 1 / empty (= unknown)
    m:<head> ...                                                   # 1 / 0: the head covers the row
    p:<head>:<label> ...                                           # probability / empty (masked)

For ``task == "multiclass"`` there is one label column ``y:class`` holding the class index
(empty = unknown) and ``p:<head>:<class name>`` per class. The sidecar holds the label names, the
head names, the recorded modalities and the task, so names containing commas or colons are safe:
the reader rebuilds the expected header from the sidecar and checks it.

Probabilities are cast to float32 and written with ``%.9g`` (9 significant digits round-trip any
float32 exactly); :func:`read_predictions` returns them as float32. Labels come back as float64
with NaN = unknown.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from kdscale.io.atomic import write_json_atomic, write_text_atomic

__all__ = ["Predictions", "MODALITIES", "META_COLUMNS", "TASKS", "write_predictions",
           "read_predictions", "subset", "align", "sidecar_path", "demographics"]

MODALITIES = ("image", "ehr", "report", "tabular")
META_COLUMNS = ("sex", "age", "ethnicity")
TASKS = ("multilabel", "multiclass")
_FORMAT = "kdscale-predictions"
_VERSION = 1
_FLOAT_FMT = "%.9g"   # max_digits10 of float32: the written value parses back to the same float32


@dataclass
class Predictions:
    """Per-sample labels, head outputs, modality presence and demographics of one split.

    ``labels``: multilabel [N, C] float (NaN = unknown); multiclass [N, 1] class index (-1 or NaN
    = unknown). ``heads[name] = (probs [N, C], mask [N] bool)``; probs are meaningless where the
    mask is False. ``present[modality]`` [N] bool for the recorded modalities. ``meta``: optional
    demographic columns ``sex``, ``age`` (float, NaN unknown), ``ethnicity`` (lists of length N).
    """

    keys: list[str]
    patient_ids: list[str]
    label_names: list[str]
    labels: np.ndarray
    heads: dict[str, tuple[np.ndarray, np.ndarray]]
    present: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, list] = field(default_factory=dict)
    task: str = "multilabel"

    def __post_init__(self):
        self.keys = [str(k) for k in self.keys]
        self.patient_ids = [str(p) for p in self.patient_ids]
        self.label_names = [str(n) for n in self.label_names]
        n = len(self.keys)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")
        if len(self.patient_ids) != n:
            raise ValueError(f"{len(self.patient_ids)} patient ids for {n} keys")
        self.labels = _label_array(self.labels, n, self.task, len(self.label_names))
        self.heads = {str(h): _head_arrays(h, pm, n, len(self.label_names))
                      for h, pm in self.heads.items()}
        self.present = {m: _bool_vector(v, n, f"present[{m!r}]") for m, v in self.present.items()}
        unknown = sorted(set(self.present) - set(MODALITIES))
        if unknown:
            raise ValueError(f"unknown modalities {unknown} in present: use {MODALITIES}")
        for col, values in self.meta.items():
            if col not in META_COLUMNS:
                raise ValueError(f"unknown meta column {col!r}: use {META_COLUMNS}")
            if len(values) != n:
                raise ValueError(f"meta[{col!r}] has {len(values)} entries for {n} samples")

    @property
    def n(self) -> int:
        return len(self.keys)

    @property
    def n_classes(self) -> int:
        """Width of every head's probability matrix (labels, or classes for multiclass)."""
        return len(self.label_names)

    def head(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(probs, mask)`` of a head; ValueError naming the known heads when absent."""
        if name not in self.heads:
            raise ValueError(f"unknown head {name!r}: the predictions hold {sorted(self.heads)}")
        return self.heads[name]


# ----------------------------------------------------------------------------- validation

def _label_array(labels, n: int, task: str, n_names: int) -> np.ndarray:
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    want = 1 if task == "multiclass" else n_names
    if y.shape != (n, want):
        what = "[N, 1] class indices" if task == "multiclass" else f"[N, {n_names}] (one per label)"
        raise ValueError(f"labels must be {what} for N = {n}, got shape {y.shape} "
                         f"(label-count mismatch?)")
    if task == "multiclass":
        y = np.where(y < 0, np.nan, y)      # -1 and NaN both mean unknown
        known = y[~np.isnan(y)]
        if np.any(known != np.round(known)) or np.any(known >= n_names):
            raise ValueError(f"multiclass labels must be class indices in [0, {n_names})")
    else:
        known = y[~np.isnan(y)]
        if np.any((known != 0) & (known != 1)):
            raise ValueError("multilabel labels must be 0, 1 or NaN (unknown)")
    return y


def _bool_vector(v, n: int, what: str) -> np.ndarray:
    a = np.asarray(v)
    if a.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {a.shape}")
    return a.astype(bool)


def _head_arrays(name, pm, n: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        probs, mask = pm
    except (TypeError, ValueError):
        raise ValueError(f"heads[{name!r}] must be a (probs, mask) pair") from None
    p = np.asarray(probs)
    if p.ndim == 1:
        p = p[:, None]
    if p.shape != (n, n_classes):
        raise ValueError(f"head {name!r}: probs shape {p.shape} != ({n}, {n_classes}) "
                         f"(label-count mismatch?)")
    return p, _bool_vector(mask, n, f"mask of head {name!r}")


# ----------------------------------------------------------------------------- subset / align

def subset(preds: Predictions, index) -> Predictions:
    """The rows selected by a boolean mask [N] or an integer index (order kept as given)."""
    idx = np.asarray(index)
    if idx.dtype == bool:
        if idx.shape != (preds.n,):
            raise ValueError(f"boolean selection has shape {idx.shape}, expected ({preds.n},)")
        idx = np.flatnonzero(idx)
    idx = idx.astype(np.int64).ravel()
    if idx.size and (idx.min() < -preds.n or idx.max() >= preds.n):
        raise ValueError(f"index out of range for {preds.n} samples")
    pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
    return Predictions(
        keys=pick(preds.keys), patient_ids=pick(preds.patient_ids),
        label_names=list(preds.label_names), labels=preds.labels[idx],
        heads={h: (p[idx], m[idx]) for h, (p, m) in preds.heads.items()},
        present={k: v[idx] for k, v in preds.present.items()},
        meta={k: pick(v) for k, v in preds.meta.items()}, task=preds.task)


def _key_index(preds: Predictions, what: str) -> dict[str, int]:
    index = {k: i for i, k in enumerate(preds.keys)}
    if len(index) != preds.n:
        raise ValueError(f"{what}: keys are not unique ({preds.n - len(index)} duplicates)")
    return index


def align(a: Predictions, b: Predictions) -> tuple[Predictions, Predictions]:
    """Both restricted to their common keys, in ``a``'s order. Raises when label names or task
    differ (the two cannot describe the same test set) or when nothing is shared."""
    if a.task != b.task or a.label_names != b.label_names:
        raise ValueError(f"cannot align predictions with different labels: {a.task} "
                         f"{len(a.label_names)} labels vs {b.task} {len(b.label_names)} labels")
    ib = _key_index(b, "second predictions")
    _key_index(a, "first predictions")
    common = [i for i, k in enumerate(a.keys) if k in ib]
    if not common:
        raise ValueError("the two predictions share no sample key")
    return subset(a, common), subset(b, [ib[a.keys[i]] for i in common])


# ----------------------------------------------------------------------------- CSV I/O

def sidecar_path(path) -> Path:
    """``<path>.json``, the sidecar holding names and task."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _header(label_names: Sequence[str], heads: Sequence[str], task: str) -> list[str]:
    y_cols = ["y:class"] if task == "multiclass" else [f"y:{n}" for n in label_names]
    return (["key", "patient_id", *META_COLUMNS] + [f"present:{m}" for m in MODALITIES] + y_cols
            + [f"m:{h}" for h in heads]
            + [f"p:{h}:{n}" for h in heads for n in label_names])


def _fmt_float(v: float) -> str:
    return "" if math.isnan(v) else _FLOAT_FMT % v


def _fmt_label(v: float, task: str) -> str:
    if math.isnan(v):
        return ""
    return str(int(v)) if task == "multiclass" or v in (0.0, 1.0) else repr(v)


def _meta_cell(preds: Predictions, col: str, i: int) -> str:
    values = preds.meta.get(col)
    if values is None:
        return ""
    v = values[i]
    if col == "age":
        age = _to_float(v)
        return "" if math.isnan(age) else repr(age)
    return "" if v is None else str(v)


def _to_float(v) -> float:
    if v is None or (isinstance(v, str) and not v.strip()):
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


_SEX_SPELLINGS = {"f": "F", "female": "F", "woman": "F", "m": "M", "male": "M", "man": "M"}


def demographics(record_meta: dict | None) -> dict:
    """A sample's ``sex``, ``age`` and ``ethnicity`` from its stored meta, under the canonical
    keys the sources write (``sex`` "F"/"M", ``age`` years, ``ethnicity``). Shards written before
    sources typed their meta columns store strings: an age of ``'54'`` is read as 54.0 (a value
    that is not a number stays unknown, NaN), and the common spellings of sex (female, Male, f ...)
    become "F"/"M"; any other sex value is kept as written. ``race`` is read when ``ethnicity``
    is absent (MIMIC's column name)."""
    meta = record_meta or {}
    sex = meta.get("sex")
    sex = "" if sex is None else str(sex).strip()
    ethnicity = meta.get("ethnicity")
    if ethnicity is None or (isinstance(ethnicity, str) and not ethnicity.strip()):
        ethnicity = meta.get("race")
    age = float("nan") if isinstance(meta.get("age"), bool) else _to_float(meta.get("age"))
    return {"sex": _SEX_SPELLINGS.get(sex.lower(), sex),
            "age": age if math.isfinite(age) and age >= 0 else float("nan"),
            "ethnicity": "" if ethnicity is None else str(ethnicity).strip()}


def write_predictions(path, preds: Predictions) -> Path:
    """Write ``preds`` to ``path`` (CSV) and ``<path>.json`` (names, task), each atomically (a
    crash never leaves a half-written file for ``kdscale report`` to read). Returns ``path``."""
    path = Path(path)
    heads = list(preds.heads)
    probs32 = {h: np.asarray(p, dtype=np.float32) for h, (p, _) in preds.heads.items()}
    with io.StringIO(newline="") as f:
        w = csv.writer(f)
        w.writerow(_header(preds.label_names, heads, preds.task))
        for i in range(preds.n):
            row = [preds.keys[i], preds.patient_ids[i]]
            row += [_meta_cell(preds, c, i) for c in META_COLUMNS]
            row += [("1" if preds.present[m][i] else "0") if m in preds.present else ""
                    for m in MODALITIES]
            row += [_fmt_label(float(v), preds.task) for v in preds.labels[i]]
            masks = [bool(preds.heads[h][1][i]) for h in heads]
            row += ["1" if m else "0" for m in masks]
            for h, covered in zip(heads, masks):
                # float(np.float32) is exact, so %.9g of it round-trips to the same float32
                row += ([_fmt_float(float(v)) for v in probs32[h][i]] if covered
                        else [""] * preds.n_classes)
            w.writerow(row)
        text = f.getvalue()
    write_text_atomic(path, text)
    side = {"format": _FORMAT, "version": _VERSION, "task": preds.task,
            "label_names": preds.label_names, "heads": heads,
            "modalities": [m for m in MODALITIES if m in preds.present],
            "meta": [c for c in META_COLUMNS if c in preds.meta], "n": preds.n}
    write_json_atomic(sidecar_path(path), side)
    return path


def _read_sidecar(path: Path) -> dict:
    side_path = sidecar_path(path)
    if not side_path.is_file():
        raise ValueError(f"{path}: sidecar {side_path.name} is missing (label and head names)")
    side = json.loads(side_path.read_text(encoding="utf-8"))
    if side.get("format") != _FORMAT:
        raise ValueError(f"{side_path}: not a kdscale predictions sidecar")
    if side.get("version") != _VERSION:
        raise ValueError(f"{side_path}: format version {side.get('version')} is not supported "
                         f"(this kdscale reads version {_VERSION})")
    return side


def _float_columns(cells: np.ndarray) -> np.ndarray:
    """Strings [N, k] -> float64 with '' as NaN."""
    if cells.size == 0:
        return np.zeros(cells.shape)
    return np.where(cells == "", "nan", cells).astype(np.float64)


def read_predictions(path) -> Predictions:
    """Read a file written by :func:`write_predictions`; ValueError naming what is wrong."""
    path = Path(path)
    side = _read_sidecar(path)
    task, names, heads = side["task"], side["label_names"], side["heads"]
    expected = _header(names, heads, task)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != expected:
        raise ValueError(f"{path}: header does not match its sidecar (expected {len(expected)} "
                         f"columns for {len(names)} labels and heads {heads})")
    body = rows[1:]
    bad = [i + 2 for i, r in enumerate(body) if len(r) != len(expected)]
    if bad:
        raise ValueError(f"{path}: line {bad[0]} has the wrong number of cells")
    cells = np.array(body, dtype=object).astype(str).reshape(len(body), len(expected))
    col = {name: j for j, name in enumerate(expected)}
    n_y = 1 if task == "multiclass" else len(names)
    y0 = col["y:class"] if task == "multiclass" else (col[f"y:{names[0]}"] if names else 0)
    labels = _float_columns(cells[:, y0:y0 + n_y])
    out_heads = {}
    for h in heads:
        mask = cells[:, col[f"m:{h}"]] == "1"
        j = col[f"p:{h}:{names[0]}"] if names else 0
        probs = _float_columns(cells[:, j:j + len(names)]).astype(np.float32)
        out_heads[h] = (probs, mask)
    present = {m: cells[:, col[f"present:{m}"]] == "1" for m in side.get("modalities", [])}
    meta = {}
    for c in side.get("meta", []):
        values = cells[:, col[c]].tolist()
        meta[c] = [_to_float(v) for v in values] if c == "age" else values
    return Predictions(keys=cells[:, 0].tolist(), patient_ids=cells[:, 1].tolist(),
                       label_names=names, labels=labels, heads=out_heads, present=present,
                       meta=meta, task=task)
