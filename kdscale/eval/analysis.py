"""Analysis of predictions files: metrics with patient-level bootstrap CIs per head and cohort,
calibration, demographic subgroups, modality utilization, paired run comparisons and robustness
to missing modalities (docs/eval.md explains every number).

All functions are pure and return plain dicts that ``json.dump`` writes as strict JSON: Python
floats / ints / strings / lists, and ``None`` wherever a value is undefined (NaN), e.g. an AUROC
on a label with one class only. A metric with a confidence interval is ``{"value", "low",
"high"}``.

Conventions:

* A head is evaluated on the rows it covers (its mask) that have at least one known label
  (multilabel) or a known class (multiclass); ``n`` counts those rows.
* Multiclass predictions are scored one-vs-rest on one-hot targets, so every head section has
  the same per-label / macro / micro AUROC and AUPRC keys; ``accuracy`` and ``f1_macro`` are
  added. The macro AUROC then equals sklearn's ``roc_auc_score(multi_class="ovr")``.
* Bootstrap: whole patients are resampled (``groups = patient_ids``; a row with an empty
  patient id is its own patient), ``n_boot`` resamples from ``seed``; every metric of one call
  uses the same resamples. Intervals are percentile intervals at level ``ci``.
* Cohorts (MedFuse): see :data:`COHORT_DEFINITIONS`. Age bands: see :data:`AGE_BANDS`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from kdscale.data.labels import prevalence, prevalence_array
from kdscale.eval.predictions import Predictions, align
from kdscale.metrics.classification import (bootstrap_ci, bootstrap_label_macros, expected_calibration_error,
                                            label_metrics, paired_bootstrap_diff, reliability_curve)
from kdscale.metrics.utilization import utilization as engine_utilization

__all__ = ["COHORT_DEFINITIONS", "AGE_BANDS", "cohorts", "head_metrics", "evaluate",
           "calibration", "subgroups", "subgroup_counts_line", "utilization", "compare", "label_columns", "robustness",
           "parse_condition", "to_jsonable"]

#: Cohort name -> definition (a sample's modalities as recorded in ``Predictions.present``).
COHORT_DEFINITIONS = {
    "all": "every sample of the split",
    "paired": "image and EHR both present (MedFuse paired test set)",
    "partial": "EHR present, image present or not (MedFuse partial test set)",
    "ehr_only": "EHR present, image absent",
    "image_only": "image present, EHR absent",
}
#: Age bands as (name, lower bound inclusive, upper bound exclusive), in years.
AGE_BANDS = (("<40", -math.inf, 40.0), ("40-59", 40.0, 60.0), ("60-79", 60.0, 80.0),
             (">=80", 80.0, math.inf))
UNKNOWN_GROUP = "unknown"


# ----------------------------------------------------------------------------- JSON helpers

def to_jsonable(obj):
    """Numpy scalars/arrays -> Python, tuples -> lists, NaN/inf -> None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def _interval(result: Mapping) -> dict:
    # the resample counts travel with every interval: an interval from few usable resamples is
    # flagged by kdscale.eval.ci_checks (console and report)
    out = {"value": result["value"], "low": result["low"], "high": result["high"]}
    for key in ("n_resamples_used", "n_resamples_undefined", "ci_method", "widened_to_point"):
        if key in result:
            out[key] = result[key]
    return out


def _check_ci(ci: float) -> float:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci!r}")
    return 1.0 - ci


# ----------------------------------------------------------------------------- targets, cohorts

def _targets(preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """Binary targets [N, C] (NaN = unknown) and the rows with at least one known target.
    Multiclass class indices become one-hot rows (all NaN when the class is unknown)."""
    if preds.task == "multiclass":
        cls = preds.labels[:, 0]
        known = ~np.isnan(cls)
        y = np.full((preds.n, preds.n_classes), np.nan)
        y[known] = np.eye(preds.n_classes)[cls[known].astype(np.int64)]
        return y, known
    return preds.labels, ~np.all(np.isnan(preds.labels), axis=1)


def _patient_groups(preds: Predictions) -> np.ndarray:
    # a row without a patient id is its own cluster (the key is unique) rather than all such rows
    # pooled into one giant "patient"
    return np.array([p if p else f"\x00key:{k}" for p, k in zip(preds.patient_ids, preds.keys)])


def _modality(preds: Predictions, name: str) -> np.ndarray:
    # an unrecorded modality counts as absent: its cohorts come out empty and are skipped
    return preds.present.get(name, np.zeros(preds.n, dtype=bool))


def cohorts(preds: Predictions) -> dict[str, np.ndarray]:
    """Boolean masks [N] of the cohorts in :data:`COHORT_DEFINITIONS` (possibly empty)."""
    image, ehr = _modality(preds, "image"), _modality(preds, "ehr")
    return {"all": np.ones(preds.n, dtype=bool), "paired": image & ehr, "partial": ehr.copy(),
            "ehr_only": ehr & ~image, "image_only": image & ~ehr}


def _cohort_mask(preds: Predictions, cohort) -> np.ndarray:
    if cohort is None:
        return np.ones(preds.n, dtype=bool)
    if isinstance(cohort, str):
        masks = cohorts(preds)
        if cohort not in masks:
            raise ValueError(f"unknown cohort {cohort!r}: use one of {sorted(masks)}")
        return masks[cohort]
    m = np.asarray(cohort)
    if m.shape != (preds.n,):
        raise ValueError(f"cohort mask has shape {m.shape}, expected ({preds.n},)")
    return m.astype(bool)


def _selection(preds: Predictions, head: str, cohort=None) -> np.ndarray:
    """Rows the head covers, inside the cohort, with at least one known target."""
    _, mask = preds.head(head)
    return mask & _cohort_mask(preds, cohort) & _targets(preds)[1]


# ----------------------------------------------------------------------------- head metrics

def _bootstrap(y, p, metric, groups, n_boot, seed, alpha) -> dict:
    return bootstrap_ci(y, p, metric, groups=groups, n_resamples=n_boot, seed=seed, alpha=alpha)


def _macro_pair(y, p, groups, n_boot, seed, alpha) -> tuple[dict, dict]:
    """Bootstrap results of the macro AUROC and AUPRC (each with per-label intervals), on one
    shared set of label-stratified resamples (kdscale.metrics.classification)."""
    both = bootstrap_label_macros(y, p, ("auroc_macro", "auprc_macro"), groups=groups,
                                  n_resamples=n_boot, seed=seed, alpha=alpha)
    return both["auroc_macro"], both["auprc_macro"]


def _per_label_section(names, y, p, roc: dict, prc: dict) -> dict:
    point = label_metrics(y, p, names)["per_label"]
    out = {}
    for j, name in enumerate(names):
        known = ~np.isnan(y[:, j])
        n_known = int(known.sum())
        out[name] = {
            "auroc": {k: roc["per_label"][k][j] for k in ("value", "low", "high",
                                                          "widened_to_point")},
            "auprc": {k: prc["per_label"][k][j] for k in ("value", "low", "high",
                                                          "widened_to_point")},
            "n_pos": point[name]["n_pos"], "n_neg": point[name]["n_neg"],
            "prevalence": prevalence(point[name]["n_pos"], n_known - point[name]["n_pos"]),
        }
    return out


def head_metrics(preds: Predictions, head: str, cohort_mask=None, n_boot: int = 1000,
                 seed: int = 0, ci: float = 0.95, signal_labels=None) -> dict:
    """Metrics of one head on the rows it covers inside ``cohort_mask`` (bool [N], a cohort
    name, or None = all), with patient-level bootstrap intervals.

    Returns ``{"head", "task", "n", "n_patients", "ci", "n_boot", "seed", "labels": {name:
    {"auroc", "auprc", "n_pos", "n_neg", "prevalence"}}, "auroc_macro", "auprc_macro",
    "auroc_micro", "auprc_micro", "n_labels_macro"}`` (+ ``"accuracy"``, ``"f1_macro"`` for
    multiclass). Macro = mean over the labels with both classes. With ``signal_labels`` (names)
    also ``"signal": {"labels", "auroc_macro", "auprc_macro", "n_labels_macro"}``: the macros over
    those labels only, on the same resamples' scheme (docs/eval.md).
    """
    alpha = _check_ci(ci)
    sel = _selection(preds, head, cohort_mask)
    if not sel.any():
        raise ValueError(f"head {head!r} covers no labelled sample in the selected cohort")
    y = _targets(preds)[0][sel]
    p = np.asarray(preds.heads[head][0], dtype=np.float64)[sel]
    groups = _patient_groups(preds)[sel]
    roc, prc = _macro_pair(y, p, groups, n_boot, seed, alpha)
    point = label_metrics(y, p, preds.label_names)
    out = {
        "head": head, "task": preds.task, "n": int(sel.sum()),
        "n_patients": len(np.unique(groups)), "ci": ci, "n_boot": n_boot, "seed": seed,
        "labels": _per_label_section(preds.label_names, y, p, roc, prc),
        "auroc_macro": _interval(roc), "auprc_macro": _interval(prc),
        "auroc_micro": _interval(_bootstrap(y, p, "auroc_micro", groups, n_boot, seed, alpha)),
        "auprc_micro": _interval(_bootstrap(y, p, "auprc_micro", groups, n_boot, seed, alpha)),
        "n_labels_macro": point["n_labels_macro"],
    }
    if signal_labels:
        out["signal"] = _signal_macros(preds.label_names, signal_labels, y, p, groups, n_boot,
                                       seed, alpha)
    if preds.task == "multiclass":
        cls = preds.labels[sel, 0].astype(np.int64)
        for metric in ("accuracy", "f1_macro"):
            out[metric] = _interval(_bootstrap(cls, p, metric, groups, n_boot, seed, alpha))
    return to_jsonable(out)


def _signal_macros(names, signal_labels, y, p, groups, n_boot, seed, alpha) -> dict:
    unknown = [s for s in signal_labels if s not in names]
    if unknown:
        raise ValueError(f"signal labels {unknown} are not labels of the predictions")
    idx = [list(names).index(s) for s in signal_labels]
    roc, prc = _macro_pair(y[:, idx], p[:, idx], groups, n_boot, seed, alpha)
    return {"labels": list(signal_labels), "auroc_macro": _interval(roc),
            "auprc_macro": _interval(prc),
            "n_labels_macro": int(sum(v is not None and not math.isnan(v)
                                      for v in roc["per_label"]["value"]))}


# ----------------------------------------------------------------------------- calibration

def calibration(preds: Predictions, head: str, cohort=None, n_bins: int = 15) -> dict:
    """ECE per label, their macro mean and the pooled ECE, and a reliability curve pooled over
    all known (sample, label) entries of the head's covered rows (one-hot classes for
    multiclass). Bins: ``n_bins`` equal-width bins of [0, 1] (kdscale.metrics.classification)."""
    sel = _selection(preds, head, cohort)
    if not sel.any():
        raise ValueError(f"head {head!r} covers no labelled sample for calibration")
    y = _targets(preds)[0][sel]
    p = np.asarray(preds.heads[head][0], dtype=np.float64)[sel]
    per_label = {name: expected_calibration_error(y[:, j], p[:, j], n_bins)
                 for j, name in enumerate(preds.label_names)}
    defined = [v for v in per_label.values() if not math.isnan(v)]
    known = ~np.isnan(y)
    centers, observed, counts = reliability_curve(y[known], p[known], n_bins)
    return to_jsonable({
        "head": head, "n": int(sel.sum()), "n_bins": n_bins, "ece": per_label,
        "ece_macro": float(np.mean(defined)) if defined else float("nan"),
        "ece_pooled": expected_calibration_error(y[known], p[known], n_bins),
        "reliability": {"bin_center": centers, "observed": observed,
                        "mean_predicted": _bin_means(p[known], n_bins), "count": counts},
    })


def _bin_means(p: np.ndarray, n_bins: int) -> np.ndarray:
    # same binning as kdscale.metrics.classification._bin_stats (p = 1 falls in the last bin)
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(b, minlength=n_bins)
    sums = np.bincount(b, weights=p, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


# ----------------------------------------------------------------------------- subgroups

def _age_band(age) -> str:
    try:
        a = float(age)
    except (TypeError, ValueError):
        return UNKNOWN_GROUP
    if math.isnan(a):
        return UNKNOWN_GROUP
    return next(name for name, lo, hi in AGE_BANDS if lo <= a < hi)


def _category(value) -> str:
    text = "" if value is None else str(value).strip()
    return text if text and text.lower() != "nan" else UNKNOWN_GROUP


def _group_values(preds: Predictions) -> dict[str, list[str]]:
    """Attribute -> per-row group name, for the demographic columns the predictions carry."""
    out = {}
    if "sex" in preds.meta:
        out["sex"] = [_category(v) for v in preds.meta["sex"]]
    if "age" in preds.meta:
        out["age_band"] = [_age_band(v) for v in preds.meta["age"]]
    if "ethnicity" in preds.meta:
        out["ethnicity"] = [_category(v) for v in preds.meta["ethnicity"]]
    return out


#: Subgroup attribute -> the Record meta key (and predictions column) it is read from.
_META_KEY = {"sex": "sex", "age_band": "age", "ethnicity": "ethnicity"}


def _group_order(attribute: str, names: set[str]) -> list[str]:
    if attribute == "age_band":
        order = [b[0] for b in AGE_BANDS] + [UNKNOWN_GROUP]
        return [n for n in order if n in names]
    return sorted(names - {UNKNOWN_GROUP}) + ([UNKNOWN_GROUP] if UNKNOWN_GROUP in names else [])


def _group_entry(preds, sel, head, n_boot, seed, alpha, min_group_size) -> dict:
    y = _targets(preds)[0][sel]
    p = np.asarray(preds.heads[head][0], dtype=np.float64)[sel]
    groups = _patient_groups(preds)[sel]
    roc, prc = _macro_pair(y, p, groups, n_boot, seed, alpha)
    n_pos = np.nansum(y, axis=0)
    n_known = (~np.isnan(y)).sum(axis=0)
    reasons = []
    if sel.sum() < min_group_size:
        reasons.append(f"n < {min_group_size}")
    missing = [name for name, k in zip(preds.label_names, n_pos) if k == 0]
    if missing:
        reasons.append(f"no positive for {len(missing)} label(s)")
    return {"n": int(sel.sum()), "n_patients": len(np.unique(groups)),
            "prevalence": dict(zip(preds.label_names, prevalence_array(n_pos, n_known).tolist())),
            "auroc_macro": _interval(roc), "auprc_macro": _interval(prc),
            "too_small": bool(reasons), "reasons": reasons, "labels_without_positive": missing}


def subgroups(preds: Predictions, head: str, n_boot: int = 1000, seed: int = 0,
              min_group_size: int = 30, ci: float = 0.95, cohort=None) -> dict:
    """The head's macro AUROC / AUPRC per demographic group (sex, age band, ethnicity).

    A group is flagged ``too_small`` when it has fewer than ``min_group_size`` rows or a label
    without any positive; its intervals are still reported where defined. Rows with a missing
    value form the group ``"unknown"``. Attributes the predictions do not carry are left out.
    Per attribute, ``n`` / ``n_known`` / ``n_unknown`` count the rows analysed and those with and
    without a value; ``warnings`` says when the analysis is empty or an attribute is unknown for
    every row (a source whose meta does not carry it), so an all-"unknown" table never passes
    silently."""
    alpha = _check_ci(ci)
    base = _selection(preds, head, cohort)
    attributes, warnings = {}, []
    n = int(base.sum())
    if not n:
        warnings.append(f"subgroup analysis is empty: head {head!r} covers no labelled sample")
    found = _group_values(preds)
    if not found:
        warnings.append("no demographic column (sex, age, ethnicity) in the predictions")
    for attribute, values in found.items():
        values = np.array(values, dtype=object)
        names = set(values[base].tolist())
        n_known = int((base & (values != UNKNOWN_GROUP)).sum())
        attributes[attribute] = {
            "n": n, "n_known": n_known, "n_unknown": n - n_known,
            "groups": {name: _group_entry(preds, base & (values == name), head, n_boot, seed,
                                          alpha, min_group_size)
                       for name in _group_order(attribute, names)}}
        if n and not n_known:
            warnings.append(f"{attribute}: every one of the {n} samples is {UNKNOWN_GROUP!r} (no sample "
                            f"carries meta '{_META_KEY[attribute]}'; check the source's meta columns)")
    return to_jsonable({"head": head, "min_group_size": min_group_size, "ci": ci,
                        "age_bands": [b[0] for b in AGE_BANDS], "attributes": attributes,
                        "warnings": warnings})


def subgroup_counts_line(section: Mapping) -> str:
    """One console line: how many analysed samples had each demographic attribute."""
    parts = [f"{name} {entry.get('n_known', 0)}/{entry.get('n', 0)}"
             for name, entry in (section.get("attributes") or {}).items()]
    return "subgroups: samples with a value: " + (", ".join(parts) if parts else "no demographic column")


# ----------------------------------------------------------------------------- utilization

UTILIZATION_HEADS = ("fusion", "image", "ehr")


def utilization(preds: Predictions) -> dict:
    """d_util (kdscale.metrics.utilization.utilization) on the paired samples: rows with image and EHR
    present, covered by the fusion, image and ehr heads, with a known label. ``d_util`` uses the
    paper's form (baseline 0); ``d_util_above_chance`` measures AUROC above 0.5."""
    missing = [h for h in UTILIZATION_HEADS if h not in preds.heads]
    if missing:
        raise ValueError(f"utilization needs the heads {UTILIZATION_HEADS}; missing {missing}")
    paired = cohorts(preds)["paired"] & _targets(preds)[1]
    labels = preds.labels[:, 0] if preds.task == "multiclass" else preds.labels
    # the engine function takes a multiclass target as a 1-D class index; unknown classes are
    # excluded through the masks, so fill them with a valid index it never looks at
    labels = np.nan_to_num(labels, nan=0.0) if preds.task == "multiclass" else labels
    engine = {h: (np.asarray(preds.heads[h][0], dtype=np.float64), preds.heads[h][1] & paired)
              for h in UTILIZATION_HEADS}
    engine["labels"] = labels
    out = engine_utilization(engine, prefix="")
    above = engine_utilization(engine, baseline=0.5, prefix="")
    out["d_util_above_chance"] = above["d_util"]
    out["heads"] = {"m_ab": "fusion", "m_a": "image", "m_b": "ehr"}
    return to_jsonable(out)


# ----------------------------------------------------------------------------- evaluate

def evaluate(preds: Predictions, main_head: str, n_boot: int = 1000, seed: int = 0,
             min_group_size: int = 30, ci: float = 0.95, signal_labels=None) -> dict:
    """Everything ``kdscale eval`` stores in ``evaluation.json`` for one run and split.

    ``heads[head][cohort]``: :func:`head_metrics` for every head and every cohort in which the
    head covers a labelled row; ``presence``: samples holding each recorded modality;
    ``calibration`` and ``subgroups``: of the main head on all its rows; ``utilization``: when
    the fusion, image and ehr heads exist."""
    preds.head(main_head)                      # ValueError naming the heads when unknown
    masks = cohorts(preds)
    heads = {}
    for head in preds.heads:
        heads[head] = {name: head_metrics(preds, head, mask, n_boot, seed, ci, signal_labels)
                       for name, mask in masks.items() if _selection(preds, head, mask).any()}
    if not heads[main_head]:
        raise ValueError(f"main head {main_head!r} covers no labelled sample")
    out = {
        "main_head": main_head, "task": preds.task, "label_names": preds.label_names,
        "n": preds.n, "n_boot": n_boot, "seed": seed, "ci": ci,
        "cohorts": {name: {"n": int(m.sum()), "definition": COHORT_DEFINITIONS[name]}
                    for name, m in masks.items()},
        "presence": {m: int(np.sum(flags)) for m, flags in preds.present.items()},
        "heads": heads,
        "calibration": calibration(preds, main_head),
        "subgroups": subgroups(preds, main_head, n_boot, seed, min_group_size, ci),
    }
    if all(h in preds.heads for h in UTILIZATION_HEADS):
        out["utilization"] = utilization(preds)
    return to_jsonable(out)


# ----------------------------------------------------------------------------- compare

def _same_labels(a: Predictions, b: Predictions) -> None:
    la, lb = a.labels, b.labels
    same = (np.isnan(la) & np.isnan(lb)) | (la == lb)
    if not same.all():
        raise ValueError(f"the two runs disagree on the labels of {int((~same.all(axis=1)).sum())}"
                         f" common samples: they were not evaluated on the same test set")


def label_columns(preds: Predictions, labels: Sequence[str]) -> list[int]:
    """The column of each named label (a label subset, e.g. eval.signal_labels); ValueError naming
    an unknown label."""
    if preds.task == "multiclass":
        raise ValueError("a label subset is for binary / multilabel tasks (a multiclass macro needs every class)")
    unknown = [n for n in labels if n not in preds.label_names]
    if unknown:
        raise ValueError(f"label {unknown[0]!r} is not a label of the runs")
    return [preds.label_names.index(n) for n in labels]


def compare(preds_a: Predictions, preds_b: Predictions, head_a: str, head_b: str,
            n_boot: int = 1000, seed: int = 0, cohort: str | None = None, *,
            name_a: str = "a", name_b: str = "b", ci: float = 0.95,
            labels: Sequence[str] | None = None) -> dict:
    """Paired patient-level bootstrap of macro AUROC and AUPRC, run a minus run b; with
    ``labels`` (e.g. eval.signal_labels) the macros are over those labels only.

    Both runs are restricted to their common keys and to the rows both heads cover (inside
    ``cohort``, a cohort name of run a's presence flags, or all). Each metric gets ``{"a", "b",
    "diff", "low", "high", "p_value", "n_resamples_used"}``: the two point values, their
    difference, its percentile CI and the two-sided bootstrap p-value of
    kdscale.metrics.classification.paired_bootstrap_diff."""
    alpha = _check_ci(ci)
    preds_a.head(head_a)
    preds_b.head(head_b)
    a, b = align(preds_a, preds_b)
    _same_labels(a, b)
    sel = _selection(a, head_a, cohort) & _selection(b, head_b, None)
    if not sel.any():
        raise ValueError(f"runs {name_a!r} ({head_a}) and {name_b!r} ({head_b}) share no "
                         f"labelled sample both heads cover"
                         + (f" in cohort {cohort!r}" if cohort else ""))
    y = _targets(a)[0][sel]
    pa = np.asarray(a.heads[head_a][0], dtype=np.float64)[sel]
    pb = np.asarray(b.heads[head_b][0], dtype=np.float64)[sel]
    if labels is not None:
        cols = label_columns(a, labels)
        y, pa, pb = y[:, cols], pa[:, cols], pb[:, cols]
    groups = _patient_groups(a)[sel]
    out = {"run_a": name_a, "run_b": name_b, "head_a": head_a, "head_b": head_b,
           "cohort": cohort or "all", "labels": "all" if labels is None else list(labels), "n": int(sel.sum()),
           "n_patients": len(np.unique(groups)), "n_boot": n_boot, "seed": seed, "ci": ci}
    for metric in ("auroc_macro", "auprc_macro"):
        d = paired_bootstrap_diff(y, pa, pb, groups=groups, metric=metric, n_resamples=n_boot,
                                  seed=seed, alpha=alpha)
        kind = metric.split("_")[0]
        out[metric] = {"a": label_metrics(y, pa)[metric], "b": label_metrics(y, pb)[metric],
                       **d, "metric": kind}
    return to_jsonable(out)


# ----------------------------------------------------------------------------- robustness

_CONDITION = re.compile(r"^(?:(full)|drop:(\w+)|random:([0-9.eE+-]+))$")


def parse_condition(name: str) -> dict:
    """``"full"`` -> kind full (rate 0); ``"drop:<modality>"`` -> kind drop; ``"random:<rate>"``
    -> kind random with the removal rate of each modality; anything else -> kind other."""
    m = _CONDITION.match(name)
    if not m:
        return {"kind": "other"}
    if m.group(1):
        return {"kind": "full", "rate": 0.0}
    if m.group(2):
        return {"kind": "drop", "modality": m.group(2)}
    try:
        rate = float(m.group(3))
    except ValueError:
        return {"kind": "other"}
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"condition {name!r}: a removal rate must lie in [0, 1]")
    return {"kind": "random", "rate": rate}


def _condition_row(preds: Predictions, head: str, n_boot: int, seed: int, alpha: float) -> dict:
    labelled = _targets(preds)[1]
    sel = _selection(preds, head)
    row = {"n_labelled": int(labelled.sum()), "n_covered": int(sel.sum()),
           "coverage": float(sel.sum() / labelled.sum()) if labelled.any() else float("nan"),
           "auroc_macro": None, "auprc_macro": None}
    if sel.any():
        y = _targets(preds)[0][sel]
        p = np.asarray(preds.heads[head][0], dtype=np.float64)[sel]
        roc, prc = _macro_pair(y, p, _patient_groups(preds)[sel], n_boot, seed, alpha)
        row["auroc_macro"], row["auprc_macro"] = _interval(roc), _interval(prc)
    return row


def robustness(results: Mapping[str, Predictions], head: str, n_boot: int = 1000,
               seed: int = 0, ci: float = 0.95) -> dict:
    """Macro AUROC / AUPRC of ``head`` under each named test condition (see
    :func:`parse_condition`). ``coverage`` = labelled rows the head covers under the condition /
    labelled rows; metrics are on the covered rows (None when the head covers nothing, e.g. the
    image head under ``drop:image``). ``curve``: the ``random`` conditions (and ``full`` as rate
    0) sorted by rate."""
    alpha = _check_ci(ci)
    if not results:
        raise ValueError("robustness needs at least one condition")
    ref_name, ref = next(iter(results.items()))
    conditions = {}
    for name, preds in results.items():
        if preds.task != ref.task or preds.label_names != ref.label_names:
            raise ValueError(f"condition {name!r} has other labels than {ref_name!r} "
                             f"({len(preds.label_names)} vs {len(ref.label_names)}): "
                             f"label-count mismatch")
        if head not in preds.heads:
            raise ValueError(f"condition {name!r}: unknown head {head!r} "
                             f"(the predictions hold {sorted(preds.heads)})")
        conditions[name] = {**parse_condition(name),
                            **_condition_row(preds, head, n_boot, seed, alpha)}
    curve = sorted(((c["rate"], name) for name, c in conditions.items()
                    if c["kind"] in ("random", "full")), key=lambda t: t[0])
    return to_jsonable({
        "head": head, "n_boot": n_boot, "seed": seed, "ci": ci, "conditions": conditions,
        "curve": {"condition": [name for _, name in curve], "rate": [r for r, _ in curve],
                  **{f"{m}_{part}": [(conditions[name][m] or {}).get(part) for _, name in curve]
                     for m in ("auroc_macro", "auprc_macro") for part in ("value", "low", "high")},
                  "coverage": [conditions[name]["coverage"] for _, name in curve]},
    })
