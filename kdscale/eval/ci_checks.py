"""Warnings about bootstrap intervals that rest on too few resamples or had to be widened.

Every interval in ``evaluation.json`` carries ``n_resamples_used`` / ``n_resamples_undefined``
(resamples in which the metric was undefined, e.g. a label lost its positives, are dropped and
counted). An interval from a minority of its resamples describes the resamples that happened to
keep every class, not the data (issue 12: 450 of 500 dropped, AUPRC 0.330 [0.360, 0.394]), so
:func:`bootstrap_warnings` lists every interval that dropped more than ``max_dropped`` of its
resamples, and every interval widened to reach its own point estimate (docs/eval.md).
"""
from __future__ import annotations

from collections.abc import Mapping

__all__ = ["MAX_DROPPED", "bootstrap_warnings"]

#: Share of dropped resamples above which an interval is reported as unreliable.
MAX_DROPPED = 0.10


def bootstrap_warnings(evaluation, max_dropped: float = MAX_DROPPED, where: str = "") -> list[str]:
    """One line per suspicious interval found anywhere in ``evaluation`` (a JSON-like tree),
    naming its path, e.g. ``heads.fusion.paired.auroc_micro: 412 of 1000 resamples dropped``."""
    found: list[str] = []
    _walk(evaluation, where, max_dropped, found)
    return found


def _walk(node, path: str, max_dropped: float, found: list[str]) -> None:
    if isinstance(node, Mapping):
        used, dropped = node.get("n_resamples_used"), node.get("n_resamples_undefined")
        if isinstance(used, int) and isinstance(dropped, int) and used + dropped > 0:
            if dropped > max_dropped * (used + dropped):
                found.append(f"{path or '<root>'}: {dropped} of {used + dropped} bootstrap "
                             f"resamples dropped (metric undefined); the interval is unreliable")
        if node.get("widened_to_point") is True:
            found.append(f"{path or '<root>'}: the percentile interval missed its point estimate "
                         f"and was widened to reach it (skewed metric, few positives)")
        for key, value in node.items():
            if key in ("per_label",):        # lists of per-label bounds: flagged per label below
                continue
            _walk(value, f"{path}.{key}" if path else str(key), max_dropped, found)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, (Mapping, list)):
                _walk(value, f"{path}[{i}]", max_dropped, found)
