"""Evaluation for students over any set of modalities (kind ``multi``) and for multiclass tasks.

* :func:`modality_subsets` / :func:`subset_cohort_metrics`: per head, metrics (patient-level
  bootstrap CIs, kdscale.eval.analysis.head_metrics) on every cohort "exactly these modalities
  present" that occurs in the test data, e.g. ``ehr+tabular``, ``ehr``, ``tabular``;
* :func:`removal_conditions`: the missing-modality robustness conditions of a student: drop
  each of its modalities in turn, and random removal at the configured rates;
* :func:`utilization_from_predictions`: d_util for N >= 2 modalities (docs/losses.md) on the
  samples with every modality;
* :func:`class_indices`: multiclass labels as stored in the shards (one-hot [N, C]) -> the
  class-index column [N, 1] of ``Predictions`` (task multiclass: accuracy, macro-F1, one-vs-rest
  AUROC/AUPRC, calibration; kdscale.eval.analysis).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from kdscale.eval.analysis import head_metrics
from kdscale.eval.report import Heading, Section, Table, _ci, _num
from kdscale.metrics.utilization import utilization_n

__all__ = ["class_indices", "modality_subsets", "subset_cohort_metrics", "removal_conditions",
           "utilization_from_predictions", "confusion_matrix"]


def class_indices(onehot: np.ndarray) -> np.ndarray:
    """One-hot labels [N, C] -> class index [N, 1] float; a row that is not exactly one-hot
    (unknown: NaN, all zero, several ones) -> -1 (unknown, excluded by the metrics)."""
    y = np.asarray(onehot, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"multiclass labels must be one-hot [N, C], got shape {y.shape}")
    finite = np.isfinite(y).all(1)
    yz = np.where(np.isfinite(y), y, 0.0)
    valid = finite & np.isin(yz, (0.0, 1.0)).all(1) & (yz.sum(1) == 1)
    idx = np.where(valid, yz.argmax(1), -1)
    return idx.astype(np.float64)[:, None]


def confusion_matrix(y: np.ndarray, p: np.ndarray, n_classes: int) -> list[list[int]]:
    """Counts [true class][predicted class = argmax p] over rows with a known class (y >= 0)."""
    y = np.asarray(y).reshape(-1)
    keep = np.isfinite(y) & (y >= 0)
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (y[keep].astype(np.int64), np.asarray(p)[keep].argmax(1)), 1)
    return out.tolist()


def modality_subsets(present: Mapping[str, np.ndarray], modalities: Sequence[str]) -> dict[str, np.ndarray]:
    """{"m1+m2": bool [N]} for every combination of ``modalities`` that occurs ("none" for
    samples with none of them), exactly these present and the others absent."""
    flags = np.stack([np.asarray(present[m], bool) for m in modalities], 1)
    out: dict[str, np.ndarray] = {}
    for pattern in sorted({tuple(r) for r in flags.tolist()}, key=lambda r: (-sum(r), [not x for x in r])):
        name = "+".join(m for m, on in zip(modalities, pattern) if on) or "none"
        out[name] = (flags == np.array(pattern)[None]).all(1)
    return out


def subset_cohort_metrics(preds, modalities: Sequence[str], heads: Sequence[str], *, n_boot: int = 1000,
                          seed: int = 0, min_group_size: int = 1) -> dict:
    """{cohort: {"n": int, "heads": {head: head_metrics}}} for every modality subset in the data;
    a head is left out of a cohort it does not cover, a cohort smaller than ``min_group_size``
    is reported with its size only (``"skipped"``)."""
    out = {}
    for name, mask in modality_subsets(preds.present, modalities).items():
        entry: dict = {"n": int(mask.sum()), "heads": {}}
        if mask.sum() < min_group_size:
            entry["skipped"] = f"fewer than {min_group_size} samples"
            out[name] = entry
            continue
        for head in heads:
            covered = np.asarray(preds.heads[head][1], bool) & mask
            if not covered.any():
                continue
            try:
                entry["heads"][head] = head_metrics(preds, head, mask, n_boot=n_boot, seed=seed)
            except ValueError as exc:   # e.g. no labelled sample: said, not dropped
                entry["heads"][head] = {"skipped": str(exc)}
        out[name] = entry
    return out


def removal_conditions(modalities: Sequence[str], random_rates: Sequence[float]) -> list[str]:
    """Robustness conditions: "drop:<m>" for each modality of the student, "random:<rate>"."""
    if len(modalities) < 2:
        return []
    return [f"drop:{m}" for m in modalities] + [f"random:{r:g}" for r in random_rates]


def utilization_from_predictions(preds, modalities: Sequence[str], *, baseline: float = 0.5) -> dict:
    """d_util over N >= 2 modalities (``kdscale.metrics.utilization.utilization_n``) on ``Predictions``
    (multilabel or multiclass), with AUROC above chance (baseline 0.5)."""
    gathered = {h: (np.asarray(p), np.asarray(m, bool)) for h, (p, m) in preds.heads.items()}
    labels = preds.labels[:, 0].astype(np.int64) if preds.task == "multiclass" else preds.labels
    if preds.task == "multiclass":   # rows with an unknown class are not covered
        known = labels >= 0
        gathered = {h: (p, m & known) for h, (p, m) in gathered.items()}
        labels = np.where(known, labels, 0)
    return utilization_n({**gathered, "labels": labels}, list(modalities), baseline=baseline, prefix="")
