"""Modality utilization (d_util) of a fused model: the rates of Wu et al. (ICML 2022) and their
N-modality spread, and both computed from gathered predictions (docs/losses.md, docs/eval.md).

One place for the metric that training logs (``kdscale.distill.tasks``: ``util/*`` in the
validation metrics) and evaluation reports (``kdscale.eval.analysis.utilization``,
``kdscale.eval.modality_eval``). numpy only, like :mod:`kdscale.metrics.classification`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from kdscale.metrics.classification import label_metrics, multiclass_metrics


def utilization_gap(m_ab: float, m_a: float, m_b: float, *, baseline: float = 0.0) -> dict[str, float]:
    """Conditional utilization rates (Wu et al., ICML 2022, form restated in method-and-data §1.6):

        u(B|A) = (M(A,B) - M(A)) / M(A,B),   u(A|B) = (M(A,B) - M(B)) / M(A,B),
        d_util = u(A|B) - u(B|A) = (M(A) - M(B)) / M(A,B)

    M is any higher-is-better metric (accuracy in Wu et al.; macro AUROC in kdscale). With
    ``baseline`` (e.g. 0.5 for AUROC) every M is replaced by M - baseline first (a chance-level
    model then scores 0); the default 0 is the paper's form. d_util > 0 means adding A to B
    helps more than adding B to A, i.e. M(A) > M(B): the fused model relies more on A (MIND's
    own sign convention is [?]; flip it by swapping the arguments).
    """
    vals = []
    for name, v in (("m_ab", m_ab), ("m_a", m_a), ("m_b", m_b)):
        fv = float(v)
        if not math.isfinite(fv):
            raise ValueError(f"{name} must be finite, got {v!r}")
        vals.append(fv - float(baseline))
    ab, a, b = vals
    if ab == 0.0:
        raise ValueError(f"M(A,B) - baseline is 0 (m_ab={m_ab!r}, baseline={baseline!r}); the rates are undefined")
    u_b_given_a = (ab - a) / ab
    u_a_given_b = (ab - b) / ab
    return {"u_b_given_a": u_b_given_a, "u_a_given_b": u_a_given_b, "d_util": u_a_given_b - u_b_given_a}


def utilization_spread(m_all: float, m_heads: Mapping[str, float], *, baseline: float = 0.0) -> dict[str, float]:
    """d_util for N >= 2 modalities (docs/losses.md): with M = a higher-is-better metric minus
    ``baseline``, M_all the fused head's and M_m modality m's aux head's, on the samples that
    have every modality:

        u_m    = (M_all - M_m) / M_all     what the other modalities add to m alone
        d_util = (max_m M_m - min_m M_m) / M_all = max_m u_m - min_m u_m   (>= 0)

    For two modalities d_util is |(M(A) - M(B)) / M(A,B)|, the magnitude of
    :func:`utilization_gap`'s d_util; 0 means the fused model draws on every modality alike."""
    if len(m_heads) < 2:
        raise ValueError(f"utilization needs 2+ modality heads, got {list(m_heads)}")
    ab = float(m_all) - float(baseline)
    vals = {}
    for name, v in [("all", m_all), *m_heads.items()]:
        if not math.isfinite(float(v)):
            raise ValueError(f"metric of {name!r} must be finite, got {v!r}")
    if ab == 0.0:
        raise ValueError(f"M_all - baseline is 0 (m_all={m_all!r}, baseline={baseline!r}); the rates are undefined")
    for name, v in m_heads.items():
        vals[name] = float(v) - float(baseline)
    out = {f"u_{m}": (ab - v) / ab for m, v in vals.items()}
    out["d_util"] = (max(vals.values()) - min(vals.values())) / ab
    return out


def _macro_auroc(y, p) -> float:
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    if y.ndim == 1 and p.ndim == 2 and p.shape[1] > 1:   # multiclass class indices
        return float(multiclass_metrics(y.astype(np.int64), p)["auroc_ovr_macro"])
    return float(label_metrics(y.astype(np.float64), p)["auroc_macro"])


def utilization(preds: Mapping, *, baseline: float = 0.0, prefix: str = "util/") -> dict:
    """d_util from the engine's gathered predictions ``{head: (probs, mask)}`` + ``"labels"``,
    option (iii) of method-and-data.md §1.6: M = macro AUROC on the PAIRED samples (covered by
    all of the fusion, image and ehr heads), M(A,B) = fusion head, M(A) = image aux head, M(B) =
    ehr aux head; u(B|A), u(A|B), d_util = u(A|B) - u(B|A) by ``utilization_gap`` (``baseline``
    0.5 measures AUROC above chance). Values are NaN when a metric is undefined (no paired
    sample, a label without both classes everywhere)."""
    for head in ("fusion", "image", "ehr"):
        if head not in preds:
            raise KeyError(f"utilization needs the {head!r} head in the predictions (MindTask.predict); "
                           f"got {sorted(preds)}")
    labels = np.asarray(preds["labels"])
    paired = np.asarray(preds["fusion"][1], bool) & np.asarray(preds["image"][1], bool) & \
        np.asarray(preds["ehr"][1], bool)
    m = {h: _macro_auroc(labels[paired], np.asarray(preds[h][0])[paired]) for h in ("fusion", "image", "ehr")}
    out = {f"{prefix}m_ab": m["fusion"], f"{prefix}m_a": m["image"], f"{prefix}m_b": m["ehr"],
           f"{prefix}n_paired": int(paired.sum())}
    nan = float("nan")
    try:
        gap = utilization_gap(m["fusion"], m["image"], m["ehr"], baseline=baseline)
    except ValueError:  # a non-finite metric, or M(A,B) == baseline
        gap = {"u_b_given_a": nan, "u_a_given_b": nan, "d_util": nan}
    out.update({f"{prefix}{k}": float(v) for k, v in gap.items()})
    return out


def utilization_n(preds: Mapping, modalities: Sequence[str], *, baseline: float = 0.0,
                  prefix: str = "util/") -> dict:
    """d_util for N >= 2 modalities (:func:`utilization_spread`) from the gathered predictions of
    a multi student with aux heads: M = macro AUROC on the samples every head covers (all
    modalities present), M_all = the fusion head, M_m = modality m's head. For two modalities
    the signed two-modality gap (:func:`utilization`'s d_util, A = first, B = second modality in
    the student's order) is added as ``d_util_signed``."""
    heads = ["fusion", *modalities]
    missing = [h for h in heads if h not in preds]
    if missing:
        raise KeyError(f"utilization needs the heads {missing} in the predictions; got {sorted(preds)}")
    labels = np.asarray(preds["labels"])
    covered = np.logical_and.reduce([np.asarray(preds[h][1], bool) for h in heads])
    m = {h: _macro_auroc(labels[covered], np.asarray(preds[h][0])[covered]) for h in heads}
    out = {f"{prefix}m_all": m["fusion"], **{f"{prefix}m_{h}": m[h] for h in modalities},
           f"{prefix}n_all_present": int(covered.sum())}
    nan = float("nan")
    try:
        spread = utilization_spread(m["fusion"], {h: m[h] for h in modalities}, baseline=baseline)
    except ValueError:
        spread = {**{f"u_{h}": nan for h in modalities}, "d_util": nan}
    out.update({f"{prefix}{k}": float(v) for k, v in spread.items()})
    if len(modalities) == 2:
        try:
            a, b = modalities
            out[f"{prefix}d_util_signed"] = float(utilization_gap(m["fusion"], m[a], m[b], baseline=baseline)["d_util"])
        except ValueError:
            out[f"{prefix}d_util_signed"] = nan
    return out
