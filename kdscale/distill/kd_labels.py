"""Which labels each head distils, chosen on validation (``students[].kd_label_min_auroc``).

A unimodal teacher may know only some of the labels: an image teacher cannot see diabetes, an
EHR teacher cannot see a pleural effusion, and its soft targets there are near-prior guesses that
pull the student's head away from what the hard labels teach. With ``kd_label_min_auroc: a`` a
head distils only the labels on which its teacher ensemble reaches AUROC >= a on the validation
split, computed from the soft labels the teacher pass wrote (the samples the ensemble saw). The
choice is made once, at train start, logged and recorded in student.json; it becomes the
explicit ``mind.kd_labels`` / ``distill.heads.<h>.kd_labels`` of docs/losses.md.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Optional

from kdscale.data.softlabel_format import SplitEnsembles, read_split_ensembles
from kdscale.distill.student_training_config import StudentRunConfig
from kdscale.metrics.classification import label_metrics

log = logging.getLogger(__name__)

SELECTION_SPLIT = "val"


def ensemble_label_auroc(split: SplitEnsembles, ensemble: str) -> dict[str, Optional[float]]:
    """{label: AUROC of the ensemble's logits on the samples it saw} (None: one class only)."""
    if ensemble not in split.ensemble_names:
        raise ValueError(f"teacher ensemble {ensemble!r} is not in the soft labels' ensembles {split.ensemble_names}")
    g = split.ensemble_names.index(ensemble)
    seen = split.ensemble_seen[:, g]
    if not seen.any():
        raise ValueError(f"teacher ensemble {ensemble!r} saw no sample of the {SELECTION_SPLIT} split")
    per_label = label_metrics(split.labels[seen], split.ensemble[seen, g], split.label_names)["per_label"]
    return {name: (None if math.isnan(m["auroc"]) else m["auroc"]) for name, m in per_label.items()}


def labels_known(aurocs: dict[str, Optional[float]], min_auroc: float) -> list[str]:
    """The labels (in task order) whose AUROC is at least ``min_auroc``."""
    return [name for name, a in aurocs.items() if a is not None and a >= min_auroc]


def distilled_heads(student: StudentRunConfig) -> dict[str, str]:
    """{head: teacher ensemble} of the heads the student distils (KD weight > 0)."""
    if student.method == "mind" and student.model.kind != "multi":
        return {m: student.ensemble_for.get(m, m) for m in student.mind.modalities
                if student.mind.weights_for(m)[1] > 0}
    return student.distill_config().teachers()


def select_kd_labels(student: StudentRunConfig, soft_dir, shard_dir) -> tuple[StudentRunConfig, dict]:
    """``student`` with explicit per-head KD labels chosen by ``kd_label_min_auroc`` on the
    validation split, and the record ``{head: {"ensemble", "min_auroc", "split", "n_samples",
    "labels", "auroc"}}``. Unchanged (and ``{}``) when the threshold is 0.

    A head whose teacher reaches the threshold on no label distils nothing: its KD weight is set
    to 0 (a warning names it; the record has ``labels: []``). Under MIND variants V2 / V3, where
    ω also weights the supervised term or does not weight KD at all, that is a ValueError instead."""
    threshold = student.kd_label_min_auroc
    if not threshold:
        return student, {}
    heads = distilled_heads(student)
    if not heads:
        return student, {}
    split = read_split_ensembles(Path(soft_dir), Path(shard_dir), SELECTION_SPLIT)
    chosen, record = {}, {}
    for head, ensemble in heads.items():
        aurocs = ensemble_label_auroc(split, ensemble)
        keep = labels_known(aurocs, threshold)
        record[head] = {"ensemble": ensemble, "min_auroc": threshold, "split": SELECTION_SPLIT,
                        "n_samples": int(split.ensemble_seen[:, split.ensemble_names.index(ensemble)].sum()),
                        "labels": keep, "auroc": aurocs}
        if keep:
            chosen[head] = keep
            continue
        best = max(((a, n) for n, a in aurocs.items() if a is not None), key=lambda t: t[0],
                   default=(float("nan"), "-"))
        what = (f"student {student.name!r}: teacher ensemble {ensemble!r} (head {head!r}) reaches {SELECTION_SPLIT} "
                f"AUROC >= {threshold} on no label (best: {best[1]!r} {best[0]:.3f})")
        if student.method == "mind" and student.mind.variant != "V1":
            raise ValueError(f"{what}; under MIND variant {student.mind.variant} its KD cannot be switched off "
                             f"alone: lower kd_label_min_auroc or use variant V1")
        log.warning("%s: that head distils nothing (KD weight 0)", what)
    return _with_kd_labels(student, chosen, set(heads) - set(chosen)), record


def _with_kd_labels(student: StudentRunConfig, chosen: dict[str, list[str]], off: set[str]) -> StudentRunConfig:
    """The student config with explicit per-head KD labels, and KD weight 0 for the ``off`` heads."""
    if student.method == "mind":
        omega = {m: (0.0 if m in off else w) for m, w in student.mind.omega.items()}
        mind = dataclasses.replace(student.mind, kd_labels=chosen or None, omega=omega)
        return dataclasses.replace(student, mind=mind, kd_label_min_auroc=0.0)
    heads = {h: dataclasses.replace(v, kd_labels=chosen.get(h, v.kd_labels), omega=0.0 if h in off else v.omega)
             for h, v in student.distill.heads.items()}
    return dataclasses.replace(student, distill=dataclasses.replace(student.distill, heads=heads),
                               kd_label_min_auroc=0.0)


def describe(record: dict, n_labels: int) -> list[str]:
    """One log line per head: how many labels it distils, and which (label names only)."""
    return [f"head {h} distils {len(r['labels'])} of {n_labels} labels (ensemble {r['ensemble']}, "
            f"{r['split']} AUROC >= {r['min_auroc']} on {r['n_samples']} samples): " + "; ".join(
                f"{n} {r['auroc'][n]:.3f}" for n in r["labels"]) for h, r in record.items()]


__all__ = ["SELECTION_SPLIT", "ensemble_label_auroc", "labels_known", "distilled_heads", "select_kd_labels",
           "describe"]
