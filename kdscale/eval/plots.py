"""Figures of the evaluation report (matplotlib, Agg backend: files only, never a window).

Every function draws one PNG (dpi 100, a few tens of kB) from a predictions object or from a
section of ``evaluation.json`` (kdscale.eval.analysis) and returns the path it wrote. Sections
hold ``None`` for undefined values; those points are left out of the plot.
"""
from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")   # before pyplot: headless, no display needed (clusters, CI)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from kdscale.metrics.classification import auroc  # noqa: E402
from kdscale.eval.predictions import Predictions  # noqa: E402

__all__ = ["roc_curves", "reliability_diagram", "robustness_curve", "subgroup_bars",
           "attention_overlays"]

DPI = 100
_MAX_LEGEND = 12   # beyond this many labels the legend would hide the curves


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def _num(v) -> float:
    return float("nan") if v is None else float(v)


# ----------------------------------------------------------------------------- ROC

def _roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR / TPR at every distinct threshold, descending (tied scores move together)."""
    order = np.argsort(-p, kind="stable")
    y, p = y[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]   # end of each tie group
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def roc_curves(preds: Predictions, head: str, path, cohort_mask=None) -> Path:
    """One ROC curve per label (one-vs-rest per class for multiclass) of the head's covered,
    labelled rows (inside ``cohort_mask`` when given); labels with one class are skipped."""
    probs, mask = preds.head(head)
    sel = mask if cohort_mask is None else mask & np.asarray(cohort_mask, dtype=bool)
    if preds.task == "multiclass":
        cls = preds.labels[:, 0]
        known_cls = ~np.isnan(cls)
        y = np.where(known_cls[:, None],
                     cls[:, None] == np.arange(preds.n_classes)[None, :], np.nan)
    else:
        y = preds.labels
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    drawn = 0
    for j, name in enumerate(preds.label_names):
        known = sel & ~np.isnan(y[:, j])
        yj, pj = y[known, j], np.asarray(probs[known, j], dtype=np.float64)
        if yj.size == 0 or yj.min() == yj.max():
            continue
        fpr, tpr = _roc_points(yj, pj)
        ax.plot(fpr, tpr, lw=1.0, label=f"{name} ({auroc(yj, pj):.3f})")
        drawn += 1
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1),
           title=f"ROC, head {head} (n = {int(sel.sum())})")
    if 0 < drawn <= _MAX_LEGEND:
        ax.legend(fontsize=6, loc="lower right", title="label (AUROC)", title_fontsize=6)
    return _save(fig, path)


# ----------------------------------------------------------------------------- calibration

def reliability_diagram(calibration_section: Mapping, path) -> Path:
    """Observed frequency vs mean predicted probability per bin (pooled over labels), with the
    bin counts as bars below and the ECE in the title."""
    rel = calibration_section["reliability"]
    mean_p = np.array([_num(v) for v in rel["mean_predicted"]])
    observed = np.array([_num(v) for v in rel["observed"]])
    counts = np.array([_num(v) for v in rel["count"]])
    centers = np.array([_num(v) for v in rel["bin_center"]])
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.5, 5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--", label="perfect")
    ok = ~np.isnan(observed) & ~np.isnan(mean_p)
    ax.plot(mean_p[ok], observed[ok], "o-", ms=3, lw=1.2, label="model")
    ece = calibration_section.get("ece_pooled")
    title = f"reliability, head {calibration_section.get('head', '?')}"
    if ece is not None:
        title += f" (ECE {ece:.3f})"
    ax.set(ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(fontsize=7, loc="upper left")
    width = 1.0 / max(len(centers), 1)
    axc.bar(centers, np.nan_to_num(counts), width=width * 0.9, color="0.5")
    axc.set(xlabel="predicted probability", ylabel="count")
    return _save(fig, path)


# ----------------------------------------------------------------------------- robustness

def robustness_curve(robustness_section: Mapping, path) -> Path:
    """Macro AUROC (with CI band) against the random modality-removal rate; the ``drop:``
    conditions are drawn as horizontal reference lines."""
    curve = robustness_section.get("curve", {})
    rate = np.array([_num(v) for v in curve.get("rate", [])])
    value = np.array([_num(v) for v in curve.get("auroc_macro_value", [])])
    low = np.array([_num(v) for v in curve.get("auroc_macro_low", [])])
    high = np.array([_num(v) for v in curve.get("auroc_macro_high", [])])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if rate.size:
        ok = ~np.isnan(value)
        ax.plot(rate[ok], value[ok], "o-", lw=1.4, label="random removal")
        band = ok & ~np.isnan(low) & ~np.isnan(high)
        ax.fill_between(rate[band], low[band], high[band], alpha=0.2)
    for i, (name, cond) in enumerate(robustness_section.get("conditions", {}).items()):
        auc = (cond.get("auroc_macro") or {}).get("value")
        if cond.get("kind") == "drop" and auc is not None:
            ax.axhline(auc, color=f"C{(i % 8) + 1}", lw=0.9, ls=":", label=name)
    ax.set(xlabel="removal rate of each modality", ylabel="macro AUROC",
           title=f"robustness, head {robustness_section.get('head', '?')}")
    ax.legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- subgroups

def subgroup_bars(subgroups_section: Mapping, path) -> Path:
    """Macro AUROC with CI per demographic group, one panel per attribute; groups flagged
    ``too_small`` are hatched and grey."""
    attributes = subgroups_section.get("attributes", {})
    names = [a for a in attributes if attributes[a].get("groups")]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.2 * max(len(names), 1), 3.4),
                             squeeze=False, sharey=True)
    for ax, attribute in zip(axes[0], names):
        groups = attributes[attribute]["groups"]
        labels = list(groups)
        vals = np.array([_num((g.get("auroc_macro") or {}).get("value")) for g in groups.values()])
        low = np.array([_num((g.get("auroc_macro") or {}).get("low")) for g in groups.values()])
        high = np.array([_num((g.get("auroc_macro") or {}).get("high")) for g in groups.values()])
        small = [bool(g.get("too_small")) for g in groups.values()]
        x = np.arange(len(labels))
        bars = ax.bar(x, np.nan_to_num(vals), color=["0.75" if s else "C0" for s in small])
        for bar, s in zip(bars, small):
            if s:
                bar.set_hatch("//")
        err = np.vstack([np.nan_to_num(vals - low), np.nan_to_num(high - vals)])
        ax.errorbar(x, np.nan_to_num(vals), yerr=np.clip(err, 0, None), fmt="none", ecolor="k",
                    lw=0.8, capsize=2)
        ax.set_xticks(x, [f"{lab}\n(n={g.get('n')})" for lab, g in zip(labels, groups.values())],
                      fontsize=7)
        ax.set_title(attribute, fontsize=9)
        ax.set_ylim(0.0, 1.0)
    axes[0][0].set_ylabel("macro AUROC")
    if not names:
        axes[0][0].text(0.5, 0.5, "no demographic columns", ha="center", va="center")
    return _save(fig, path)


# ----------------------------------------------------------------------------- attention

def attention_overlays(images, maps, boxes: Sequence[Sequence[Sequence[float]]],
                       titles: Sequence[str] | None, path, ncols: int = 4,
                       alpha: float = 0.45) -> Path:
    """Grid of images ([N, H, W] grey or [N, H, W, 3] RGB, in [0, 1]) with their heat maps
    ([N, H, W]) overlaid and the ground-truth boxes ``(x, y, w, h)`` (map pixel coordinates)
    drawn as rectangles."""
    images, maps = np.asarray(images, dtype=np.float64), np.asarray(maps, dtype=np.float64)
    n = len(images)
    if n == 0:
        raise ValueError("attention_overlays needs at least one image")
    if maps.shape[0] != n or maps.shape[1:3] != images.shape[1:3]:
        raise ValueError(f"maps {maps.shape} do not match images {images.shape}")
    if len(boxes) != n or (titles is not None and len(titles) != n):
        raise ValueError(f"need one box list and one title per image ({n} images)")
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.4 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, ax in enumerate(axes.ravel()[:n]):
        img = np.clip(images[i], 0, 1)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        ax.imshow(maps[i], cmap="jet", alpha=alpha)
        for x, y, w, h in boxes[i]:
            # imshow puts pixel (r, c) centred at (c, r): the box's continuous edge x is at x-0.5
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, ec="lime", lw=1.2))
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=7)
    return _save(fig, path)
