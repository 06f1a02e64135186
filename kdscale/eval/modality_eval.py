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
    from kdscale.eval.analysis import head_metrics

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
    from kdscale.metrics.utilization import utilization_n

    gathered = {h: (np.asarray(p), np.asarray(m, bool)) for h, (p, m) in preds.heads.items()}
    labels = preds.labels[:, 0].astype(np.int64) if preds.task == "multiclass" else preds.labels
    if preds.task == "multiclass":   # rows with an unknown class are not covered
        known = labels >= 0
        gathered = {h: (p, m & known) for h, (p, m) in gathered.items()}
        labels = np.where(known, labels, 0)
    return utilization_n({**gathered, "labels": labels}, list(modalities), baseline=baseline, prefix="")


def report_section(runs):
    """The report's "Modalities and classes" section (kdscale.eval.report): per kind-multi run,
    its parameters by module, the metrics per modality subset, N-modality d_util, and for a
    multiclass task the confusion matrix of the routed head."""
    from kdscale.eval.report import Heading, Section, Table, _ci, _num

    section = Section("modalities", "Modalities, parameters and classes")
    for run in runs:
        ev = run.evaluation
        if not any(k in ev for k in ("modality_cohorts", "parameter_breakdown", "confusion_matrix")):
            continue
        section.blocks.append(Heading(run.label))
        parts = ev.get("parameter_breakdown") or {}
        if parts:
            section.blocks.append(Table(["module", "parameters"], [[k, f"{v:,}"] for k, v in parts.items()],
                                        "Parameters of the modules actually built; the parts sum to the total."))
        multiclass = ev.get("task") == "multiclass"
        rows = []
        for cohort, entry in (ev.get("modality_cohorts") or {}).items():
            if entry.get("skipped"):
                rows.append([cohort, _num(entry.get("n")), "-", entry["skipped"], "", ""] + (["", ""] if multiclass else []))
                continue
            for head, m in entry.get("heads", {}).items():
                row = [cohort, _num(entry.get("n")), head, _ci(m.get("auroc_macro")), _ci(m.get("auprc_macro")),
                       _num(m.get("n"))]
                if multiclass:
                    row += [_ci(m.get("accuracy")), _ci(m.get("f1_macro"))]
                rows.append(row)
        if rows:
            section.blocks.append(Table(
                ["modalities present", "n", "head", "macro AUROC", "macro AUPRC", "n covered"]
                + (["accuracy", "macro F1"] if multiclass else []), rows,
                "Every combination of the student's modalities that occurs in the split (exactly these present)."))
        util = ev.get("utilization_n")
        if util:
            section.blocks.append(Table(["quantity", "value"], [[k, _num(v)] for k, v in util.items()],
                                        "d_util over N modalities, AUROC above chance (docs/losses.md)."))
        cm = ev.get("confusion_matrix")
        if cm:
            classes = list(cm["classes"])
            section.blocks.append(Table(["true \\ predicted", *classes],
                                        [[c, *[str(v) for v in row]] for c, row in zip(classes, cm["counts"])],
                                        f"Confusion matrix of the {cm['head']} head (argmax of the class probabilities)."))
    return section.note_if_empty("No run over a configurable set of modalities.")
