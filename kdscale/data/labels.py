"""Label bookkeeping shared by every stage: the one definition of prevalence, and the per-split
tally of positives / negatives / unknown labels (with the raw values that mapped to each) that
the console table shows.

Unknown labels are NaN in ``Record.labels`` (as MIMIC's CheXpert blanks and the loader's label
masks already treat them): they are excluded from training losses and metrics, and from
prevalence. Pure functions and plain counters only; no I/O.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Iterable, Optional, Sequence

import numpy as np

OUTCOMES = ("positive", "negative", "unknown")
MAX_SHOWN_VALUES = 6      # raw values listed per cell of the console table
MAX_VALUE_CHARS = 24      # a label cell is a code, not text; longer values are cut


def prevalence(n_pos: float, n_neg: float) -> float:
    """positives / (positives + negatives); unknown labels are excluded. NaN when nothing is known.

    The ONE definition used by ``kdscale inspect``, the shard build summary and the report."""
    known = n_pos + n_neg
    return float(n_pos) / float(known) if known > 0 else float("nan")


def prevalence_array(n_pos: np.ndarray, n_known: np.ndarray) -> np.ndarray:
    """``prevalence`` element-wise, from positive and known (positive + negative) counts."""
    n_pos = np.asarray(n_pos, dtype=np.float64)
    n_known = np.asarray(n_known, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_known > 0, n_pos / np.maximum(n_known, 1), np.nan)


def label_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positives, negatives, unknown) per column of a [N, C] (or [C]) 0/1/NaN label array."""
    y = np.asarray(labels, dtype=np.float64)
    y = y.reshape(1, -1) if y.ndim == 1 else y
    unknown = np.isnan(y)
    return ((y == 1).sum(axis=0), ((y == 0) & ~unknown).sum(axis=0), unknown.sum(axis=0))


def outcome_of(value: float) -> str:
    return "unknown" if value is None or (isinstance(value, float) and math.isnan(value)) else \
        ("positive" if value == 1 else "negative")


def shown_value(raw: Optional[str]) -> str:
    """How a raw label cell appears in the table: blank as <blank>, long values cut."""
    text = "" if raw is None else str(raw).strip()
    if not text:
        return "<blank>"
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS - 1] + "~"


class LabelTally:
    """split -> label -> outcome -> Counter(raw value). Filled by a source as it maps values."""

    def __init__(self) -> None:
        self.values: dict = defaultdict(lambda: defaultdict(lambda: {o: Counter() for o in OUTCOMES}))

    def add(self, split: str, label: str, outcome: str, raw: Optional[str]) -> None:
        self.values[split][label][outcome][shown_value(raw)] += 1

    def to_json(self, top: int = 20) -> dict:
        """The ``top`` most frequent values per outcome; the rest summed under "<other values>"
        (a column of free text must not copy itself into every summary)."""
        return {split: {label: {o: _top(c, top) for o, c in outcomes.items()}
                        for label, outcomes in per_label.items()}
                for split, per_label in sorted(self.values.items())}


def _top(counter: Counter, top: int) -> dict:
    out = dict(counter.most_common(top))
    rest = sum(counter.values()) - sum(out.values())
    if rest:
        out["<other values>"] = rest
    return out


def _values_cell(values: dict) -> str:
    items = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{shown_value(v) if v != '<blank>' else v} ({n})" for v, n in items[:MAX_SHOWN_VALUES])
    if len(items) > MAX_SHOWN_VALUES:
        shown += f", +{len(items) - MAX_SHOWN_VALUES} more"
    return shown


def format_label_table(counts: dict, values: Optional[dict] = None) -> str:
    """Console table per split and label: positives / negatives / unknown / prevalence, and
    (when the source recorded them) the raw values that mapped to each outcome.

    ``counts``: split -> label -> {"positive", "negative", "unknown"}; ``values``: LabelTally JSON."""
    lines = [f"{'split':<6} {'label':<18} {'pos':>6} {'neg':>6} {'unknown':>8} {'prevalence':>10}"]
    for split, per_label in counts.items():
        for label, c in per_label.items():
            prev = prevalence(c["positive"], c["negative"])
            lines.append(f"{split:<6} {label[:18]:<18} {c['positive']:>6} {c['negative']:>6} "
                         f"{c['unknown']:>8} {'-' if math.isnan(prev) else f'{prev:.3f}':>10}")
            raw = (values or {}).get(split, {}).get(label)
            for outcome in OUTCOMES if raw else ():
                if raw.get(outcome):
                    lines.append(f"{'':<6}   {outcome} <- {_values_cell(raw[outcome])}")
    return "\n".join(lines)


def never_seen(listed: Sequence[str], seen: Iterable[str], norm=lambda v: v.strip().casefold()) -> list[str]:
    """The listed label values that never occurred among ``seen`` (compared normalized)."""
    seen_norm = {norm(v) for v in seen}
    return [v for v in listed if norm(v) not in seen_norm]
