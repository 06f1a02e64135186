"""Label-leakage checks for teachers (issue 16): privileged inputs that give the answer away.

A teacher that reads a tabular column which IS the label (a diagnosis code, a BI-RADS
assessment, a "survival" field for a mortality label), or a report whose one word spells the
finding, reaches near-perfect validation AUROC and distils nothing a student can learn from the
image. Nothing stops such a teacher; these checks make it visible, as a warning naming the
column (or token) and the label, on the console, in ``teacher.json`` and in the report:

* **tabular**: on the TRAINING split, a column whose every distinct value maps to a single
  label value (a pure partition, both label values present), with far fewer distinct values
  than samples (``min_rows_per_value`` on average, so an ID or a continuous measurement that is
  unique per row does not count);
* **text**: a single token (lower-cased word) whose presence alone separates the positives from
  the negatives of a label on the training split;
* **score**: a validation macro (or per-label) AUROC >= ``AUROC_LIMIT``.

The checks are pure functions over rows and labels (tested by hand); ``kdscale.distill.teachers``
runs them for every teacher after training. The CBIS source keeps its own exclusion of the
BI-RADS assessment (``data.cbis.include_assessment``).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Iterable, Optional, Sequence

import numpy as np

AUROC_LIMIT = 0.99
MIN_ROWS_PER_VALUE = 5.0        # a column with fewer samples per distinct value looks like an ID
MIN_CLASS_ROWS = 3              # fewer positives or negatives than this: nothing to say
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def _binary_targets(labels: np.ndarray, label_names: Sequence[str], task: str) -> list[tuple[str, np.ndarray]]:
    """(label name, float targets with NaN = unknown) per label; multiclass one-vs-rest, from
    class indices [N] / [N, 1] or one-hot rows [N, C] (a row with NaN = unknown)."""
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if task == "multiclass" and y.shape[1] == len(label_names) and len(label_names) > 1:
        unknown = np.isnan(y).any(axis=1)
        return [(name, np.where(unknown, np.nan, y[:, j])) for j, name in enumerate(label_names)]
    if task == "multiclass":
        cls = y[:, 0]
        return [(name, np.where(np.isnan(cls) | (cls < 0), np.nan, (cls == j).astype(float)))
                for j, name in enumerate(label_names)]
    return [(name, y[:, j]) for j, name in enumerate(label_names)]


def _cell_key(value) -> Optional[str]:
    """A tabular cell as a comparable value; None for missing (blank, None, NaN)."""
    if value is None:
        return None
    if isinstance(value, float):
        return None if math.isnan(value) else repr(value)
    text = str(value).strip()
    return text or None


def tabular_leaks(rows: Sequence[Optional[dict]], labels: np.ndarray, label_names: Sequence[str],
                  task: str = "multilabel", min_rows_per_value: float = MIN_ROWS_PER_VALUE) -> list[dict]:
    """Columns that determine a label on these (training) rows. ``rows[i]``: the sample's
    tabular dict (None = no tabular data); ``labels``: [N, C] (NaN unknown) or [N, 1] class ids."""
    columns = sorted({c for r in rows if r for c in r})
    findings = []
    for name, y in _binary_targets(labels, label_names, task):
        for column in columns:
            by_value: dict[str, set] = defaultdict(set)
            n = 0
            for row, target in zip(rows, y):
                if not row or np.isnan(target):
                    continue
                key = _cell_key(row.get(column))
                if key is None:
                    continue
                by_value[key].add(int(target))
                n += 1
            classes = set().union(*by_value.values()) if by_value else set()
            if classes != {0, 1} or n < 2 * MIN_CLASS_ROWS:
                continue
            if any(len(v) > 1 for v in by_value.values()):
                continue
            if len(by_value) > n / min_rows_per_value:
                continue                                   # (nearly) one value per row: an ID
            findings.append({"kind": "tabular", "column": column, "label": name, "distinct_values": len(by_value),
                             "rows": n, "message": f"tabular column {column!r} determines label {name!r} on the "
                                                   f"training split ({len(by_value)} distinct values over {n} "
                                                   f"samples, each value with one label value)"})
    return findings


def tokens(text: str) -> set[str]:
    return set(_TOKEN.findall(text.lower()))


def text_leaks(texts: Sequence[Optional[str]], labels: np.ndarray, label_names: Sequence[str],
               task: str = "multilabel") -> list[dict]:
    """Tokens whose presence alone separates a label's positives from its negatives on these
    (training) texts (``texts[i]`` None = no text)."""
    docs = [tokens(t) if t else None for t in texts]
    holders: dict[str, set] = defaultdict(set)          # token -> the samples whose text has it
    for i, doc in enumerate(docs):
        for token in doc or ():
            holders[token].add(i)
    findings = []
    for name, y in _binary_targets(labels, label_names, task):
        known = frozenset(i for i, (d, t) in enumerate(zip(docs, y)) if d is not None and not np.isnan(t))
        pos = frozenset(i for i in known if y[i] == 1)
        neg = known - pos
        if len(pos) < MIN_CLASS_ROWS or len(neg) < MIN_CLASS_ROWS:
            continue
        smallest = min(len(pos), len(neg))
        for token, everywhere in sorted(holders.items()):
            if len(everywhere) < smallest:              # cannot cover either class
                continue
            where = everywhere & known
            if where == pos or where == neg:
                side = "positive" if where == pos else "negative"
                findings.append({"kind": "text", "token": token, "label": name, "rows": len(known),
                                 "message": f"report token {token!r} determines label {name!r} on the training "
                                            f"split (present in exactly the {len(where)} {side} samples of "
                                            f"{len(known)})"})
    return findings


def score_leaks(history: Iterable[dict], label_names: Sequence[str], limit: float = AUROC_LIMIT) -> list[dict]:
    """A validation AUROC at or above ``limit`` in the best record of the training history
    (the macro, and each label where the history has per-label values)."""
    records = [r for r in history if r.get("auroc_macro") is not None]
    if not records:
        return []
    best = max(records, key=lambda r: r["auroc_macro"])
    findings = []
    if best["auroc_macro"] >= limit:
        findings.append({"kind": "score", "label": "macro", "auroc": best["auroc_macro"],
                         "message": f"validation macro AUROC {best['auroc_macro']:.4f} >= {limit}: "
                                    f"check its inputs for the label"})
    for name in label_names:
        value = best.get(f"auroc/{name}")
        if value is not None and value >= limit:
            findings.append({"kind": "score", "label": name, "auroc": value,
                             "message": f"validation AUROC of label {name!r} {value:.4f} >= {limit}"})
    return findings
