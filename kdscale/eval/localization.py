"""Localization scores of saliency / attention maps against ground-truth boxes (numpy).

Definitions follow method-and-data.md §2.5 (the MMPKD paper's own are unknown; these are the
kdscale defaults [K]). Maps are [H, W] (or a batch [B, H, W]) with values in [0, 1] (see
``normalize_map``); ground truth is a boolean mask of the same shape, the union of the image's
boxes after the image's own resize / crop (``transform_boxes`` then ``boxes_to_mask``).

Binarisation (``rule``, threshold ``t``):

* ``"fixed"``: pixel activated when ``map >= t`` (e.g. t = 0.5 on min-max normalised maps).
* ``"top_percent"``: the top ``t`` percent of pixels, 0 < t <= 100: activated when
  ``map >= v_k``, v_k the k-th largest value, k = ceil(t/100 * H*W). Pixels tied with v_k are all
  activated, so ties (e.g. a constant map) can activate more than k pixels.

Per image, with M the activated pixels and G the ground truth:

* IoU = |M & G| / |M | G| (NaN when both are empty).
* ``fpr_pixel`` = FP / (FP + TN), the share of background pixels activated (NaN if G covers all).
* ``fpr_area`` = FP / (FP + TP), the share of the activated area outside the boxes (NaN if M is
  empty). The reported MMPKD FPR (0.86 -> 0.76) looks more like this one [?]; log both.
* ``pointing_game``: 1 if the (first, row-major) argmax pixel lies within ``tolerance_px``
  (Euclidean distance in pixels) of a G pixel, else 0; NaN when G is empty.
* ``detection_auroc``: pixel-level ROC AUC of map values vs G (ties count 1/2); NaN when G is
  empty or covers the whole image.

Box convention: ``(x, y, w, h)`` in pixels, x to the right, y down, the box covering the
continuous region [x, x + w) x [y, y + h). ``boxes_to_mask`` marks pixel (r, c) when its
centre (c + 0.5, r + 0.5) lies inside, i.e. columns round(x) .. round(x + w) - 1 (round half up).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kdscale.data.transforms import letterbox_geometry
from kdscale.metrics.classification import _auroc_rows

__all__ = [
    "boxes_to_mask", "scale_boxes", "transform_boxes", "binarize", "iou", "fpr_pixel", "fpr_area",
    "pointing_game", "detection_auroc", "localization_summary", "normalize_map", "upsample",
    "LOCALIZATION_METRICS", "REFERENCE_MAPS", "reference_maps", "area_fraction",
    "localization_references",
]

#: Trivial maps every localization table is read against (docs/eval.md, issue 12 item 6).
REFERENCE_MAPS = {
    "ref:uniform_random": "i.i.d. uniform noise per pixel (seeded): chance",
    "ref:area_prior": "mean region mask of the OTHER images (leave-one-out): where regions "
                      "usually are, never this image's own",
    "ref:intensity_bright": "the image's grey level: bright pixels first",
    "ref:intensity_dark": "the inverted grey level: dark pixels first",
}

LOCALIZATION_METRICS = ("iou", "fpr_pixel", "fpr_area", "pointing_game", "detection_auroc")


# ----------------------------------------------------------------------------- boxes

def _boxes_array(boxes) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4))
    b = b.reshape(-1, 4) if b.ndim == 1 else b
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (x, y, w, h) rows, got shape {b.shape}")
    if np.any(b[:, 2:] < 0):
        raise ValueError("box width/height must be >= 0")
    return b


def boxes_to_mask(boxes, shape: tuple[int, int]) -> np.ndarray:
    """Boolean [H, W] union mask of ``(x, y, w, h)`` boxes (pixel-centre rule, clipped)."""
    H, W = int(shape[0]), int(shape[1])
    mask = np.zeros((H, W), dtype=bool)
    b = _boxes_array(boxes)
    if len(b) == 0:
        return mask
    x0 = np.clip(np.floor(b[:, 0] + 0.5), 0, W).astype(int)
    x1 = np.clip(np.floor(b[:, 0] + b[:, 2] + 0.5), 0, W).astype(int)
    y0 = np.clip(np.floor(b[:, 1] + 0.5), 0, H).astype(int)
    y1 = np.clip(np.floor(b[:, 1] + b[:, 3] + 0.5), 0, H).astype(int)
    for a, bb, c, d in zip(y0, y1, x0, x1):        # few boxes per image
        mask[a:bb, c:d] = True
    return mask


def scale_boxes(boxes, orig_size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """Boxes of an image of ``orig_size`` = (width, height) resized to ``new_size`` = (width,
    height) (e.g. MIMIC-CXR's offline width-512 resize). Returns float [K, 4]."""
    b = _boxes_array(boxes).copy()
    sx = new_size[0] / orig_size[0]
    sy = new_size[1] / orig_size[1]
    b[:, [0, 2]] *= sx
    b[:, [1, 3]] *= sy
    return b


def _resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision ``Resize(int)``: the shorter side becomes ``shorter``, the longer one
    ``int(shorter * long / short)`` (truncated)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def _crop_offset(size: int, crop: int) -> int:
    """torchvision ``CenterCrop`` offset: ``int(round((size - crop) / 2))``; when the image is
    smaller than the crop it is zero-padded by ``(crop - size) // 2`` first (negative offset)."""
    if size >= crop:
        return int(round((size - crop) / 2.0))
    return -((crop - size) // 2)


def transform_boxes(boxes, orig_size: tuple[int, int], resize_shorter: int | None,
                    crop_size: int | tuple[int, int], pad_to_square: bool = False) -> tuple[np.ndarray, int]:
    """Map ``(x, y, w, h)`` boxes through torchvision ``Resize(resize_shorter)`` +
    ``CenterCrop(crop_size)``, after the loader's letterbox when ``pad_to_square``
    (kdscale.data.transforms.PadToSquare: the boxes move by the padding, the image becomes square).

    ``orig_size`` = (width, height) of the image the boxes refer to; ``crop_size`` an int or
    (width, height); ``resize_shorter=None`` skips the resize. Each axis is scaled by
    new/orig of that axis (torchvision truncates the longer side, so the two factors may differ
    slightly), shifted by the crop offset, then clipped to the crop. Returns ``(boxes [K, 4]
    float, n_dropped)``, where dropped boxes have no area left inside the crop.
    """
    W0, H0 = int(orig_size[0]), int(orig_size[1])
    if pad_to_square:
        side, left, top = letterbox_geometry(W0, H0)
        boxes = _boxes_array(boxes).copy()
        boxes[:, 0] += left
        boxes[:, 1] += top
        W0 = H0 = side
    cw, ch = (crop_size, crop_size) if np.isscalar(crop_size) else (int(crop_size[0]),
                                                                     int(crop_size[1]))
    W1, H1 = (W0, H0) if resize_shorter is None else _resized_size(W0, H0, int(resize_shorter))
    b = scale_boxes(boxes, (W0, H0), (W1, H1))
    ox, oy = _crop_offset(W1, cw), _crop_offset(H1, ch)
    x0 = np.clip(b[:, 0] - ox, 0, cw)
    y0 = np.clip(b[:, 1] - oy, 0, ch)
    x1 = np.clip(b[:, 0] + b[:, 2] - ox, 0, cw)
    y1 = np.clip(b[:, 1] + b[:, 3] - oy, 0, ch)
    keep = (x1 > x0) & (y1 > y0)
    out = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)[keep]
    return out, int((~keep).sum())


# ----------------------------------------------------------------------------- maps

def _batch(a, name: str) -> tuple[np.ndarray, bool]:
    a = np.asarray(a)
    if a.ndim == 2:
        return a[None], True
    if a.ndim != 3:
        raise ValueError(f"{name} must be [H, W] or [B, H, W], got shape {a.shape}")
    return a, False


def _unbatch(v: np.ndarray, single: bool):
    return float(v[0]) if single else v


def normalize_map(m) -> np.ndarray:
    """Min-max normalise each [H, W] map (of [H, W] or [B, H, W]) to [0, 1]; constant maps
    (max == min) become zeros. Returns float32."""
    a, single = _batch(np.asarray(m, dtype=np.float32), "map")
    lo = a.min(axis=(1, 2), keepdims=True)
    rng = a.max(axis=(1, 2), keepdims=True) - lo
    out = np.divide(a - lo, rng, out=np.zeros_like(a), where=rng > 0)
    return out[0] if single else out


def upsample(m, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize (``torch.nn.functional.interpolate``, align_corners=False) of [h, w] or
    [B, h, w] maps (numpy or torch) to ``size`` = (H, W) or H = W = size. Returns numpy float32."""
    t = m.detach().float().cpu() if isinstance(m, torch.Tensor) else torch.as_tensor(
        np.asarray(m, dtype=np.float32))
    single = t.dim() == 2
    if t.dim() not in (2, 3):
        raise ValueError(f"map must be [h, w] or [B, h, w], got {tuple(t.shape)}")
    size = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    x = t[None, None] if single else t[:, None]
    out = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    out = out[0, 0] if single else out[:, 0]
    return out.numpy()


def binarize(m, rule: str = "fixed", t: float = 0.5) -> np.ndarray:
    """Boolean activation mask of [H, W] or [B, H, W] maps (see module doc for the rules)."""
    a, single = _batch(np.asarray(m, dtype=np.float64), "map")
    if rule == "fixed":
        out = a >= t
    elif rule == "top_percent":
        if not 0 < t <= 100:
            raise ValueError(f"top_percent needs 0 < t <= 100, got {t}")
        B, H, W = a.shape
        n = H * W
        k = max(1, min(n, math.ceil(t / 100.0 * n - 1e-9)))
        flat = a.reshape(B, n)
        thr = np.partition(flat, n - k, axis=1)[:, n - k]
        out = a >= thr[:, None, None]
    else:
        raise ValueError(f"rule must be 'fixed' or 'top_percent', not {rule!r}")
    return out[0] if single else out


def _confusion(m, gt_mask, rule, t):
    act = binarize(m, rule, t)
    act, single = _batch(act, "map")
    g, _ = _batch(np.asarray(gt_mask).astype(bool), "gt_mask")
    if g.shape != act.shape:
        raise ValueError(f"map and gt_mask shapes differ: {act.shape} vs {g.shape}")
    tp = (act & g).sum(axis=(1, 2)).astype(np.float64)
    fp = (act & ~g).sum(axis=(1, 2)).astype(np.float64)
    fn = (~act & g).sum(axis=(1, 2)).astype(np.float64)
    tn = (~act & ~g).sum(axis=(1, 2)).astype(np.float64)
    return tp, fp, fn, tn, single


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def iou(m, gt_mask, rule: str = "fixed", t: float = 0.5):
    """|M & G| / |M | G| per image (float, or [B] array for a batch)."""
    tp, fp, fn, _, single = _confusion(m, gt_mask, rule, t)
    return _unbatch(_ratio(tp, tp + fp + fn), single)


def fpr_pixel(m, gt_mask, rule: str = "fixed", t: float = 0.5):
    """FP / (FP + TN): share of background pixels activated."""
    _, fp, _, tn, single = _confusion(m, gt_mask, rule, t)
    return _unbatch(_ratio(fp, fp + tn), single)


def fpr_area(m, gt_mask, rule: str = "fixed", t: float = 0.5):
    """FP / (FP + TP): share of the activated area outside the ground truth."""
    tp, fp, _, _, single = _confusion(m, gt_mask, rule, t)
    return _unbatch(_ratio(fp, fp + tp), single)


def pointing_game(m, gt_mask, tolerance_px: float = 0):
    """1.0 if the map's argmax is within ``tolerance_px`` of the ground truth, else 0.0; NaN if
    the ground truth is empty. Batched input gives a [B] array."""
    a, single = _batch(np.asarray(m, dtype=np.float64), "map")
    g, _ = _batch(np.asarray(gt_mask).astype(bool), "gt_mask")
    if g.shape != a.shape:
        raise ValueError(f"map and gt_mask shapes differ: {a.shape} vs {g.shape}")
    B, H, W = a.shape
    am = a.reshape(B, -1).argmax(axis=1)
    r, c = am // W, am % W
    if tolerance_px <= 0:
        hit = g[np.arange(B), r, c]
    else:
        rr = np.arange(H)[None, :, None] - r[:, None, None]
        cc = np.arange(W)[None, None, :] - c[:, None, None]
        near = rr * rr + cc * cc <= float(tolerance_px) ** 2
        hit = (near & g).any(axis=(1, 2))
    out = np.where(g.any(axis=(1, 2)), hit.astype(np.float64), np.nan)
    return _unbatch(out, single)


def detection_auroc(m, gt_mask):
    """Pixel-level ROC AUC of map values vs the ground-truth mask, per image."""
    a, single = _batch(np.asarray(m, dtype=np.float64), "map")
    g, _ = _batch(np.asarray(gt_mask).astype(bool), "gt_mask")
    if g.shape != a.shape:
        raise ValueError(f"map and gt_mask shapes differ: {a.shape} vs {g.shape}")
    B = a.shape[0]
    return _unbatch(_auroc_rows(a.reshape(B, -1), g.reshape(B, -1)), single)


# ----------------------------------------------------------------------------- summary

def localization_summary(maps, masks, rule: str = "fixed", t: float = 0.5, seed: int = 0,
                         n_resamples: int = 1000, *, tolerance_px: float = 0,
                         alpha: float = 0.05) -> dict:
    """All localization metrics over a set of images, with percentile bootstrap CIs over images.

    ``maps`` [B, H, W] (or a list of [H, W]) in [0, 1], ``masks`` boolean of the same shape.
    Returns ``{"rule", "t", "tolerance_px", "n_images", <metric>: {"mean", "std", "low", "high",
    "n", "n_resamples_used", "n_resamples_undefined"}, "per_image": {<metric>: [B] array}}`` for
    the metrics in ``LOCALIZATION_METRICS``.
    Images where a metric is undefined (NaN) are left out of that metric's mean and bootstrap
    (``n`` counts the rest). All metrics share the same image resamples (seeded).
    """
    a = np.stack([np.asarray(x) for x in maps]) if isinstance(maps, (list, tuple)) else \
        np.asarray(maps)
    g = np.stack([np.asarray(x) for x in masks]) if isinstance(masks, (list, tuple)) else \
        np.asarray(masks)
    a, _ = _batch(a, "maps")
    g, _ = _batch(g.astype(bool), "masks")
    if a.shape != g.shape:
        raise ValueError(f"maps and masks shapes differ: {a.shape} vs {g.shape}")
    B = a.shape[0]
    tp, fp, fn, tn, _ = _confusion(a, g, rule, t)
    per = {
        "iou": _ratio(tp, tp + fp + fn),
        "fpr_pixel": _ratio(fp, fp + tn),
        "fpr_area": _ratio(fp, fp + tp),
        "pointing_game": np.asarray(pointing_game(a, g, tolerance_px), dtype=np.float64),
        "detection_auroc": np.asarray(detection_auroc(a, g), dtype=np.float64),
    }
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, B, size=(n_resamples, B)) if B else np.zeros((n_resamples, 0), int)
    flat = (draws + (np.arange(n_resamples) * B)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_resamples * B).reshape(n_resamples, B).astype(float)
    out = {"rule": rule, "t": t, "tolerance_px": tolerance_px, "n_images": B, "per_image": per}
    for name, v in per.items():
        ok = ~np.isnan(v)
        n = int(ok.sum())
        entry = {"mean": float("nan"), "std": float("nan"), "low": float("nan"),
                 "high": float("nan"), "n": n}
        if n:
            vv = v[ok]
            entry["mean"] = float(vv.mean())
            entry["std"] = float(vv.std(ddof=1)) if n > 1 else 0.0
            w = counts[:, ok]
            tot = w.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                boot = (w @ vv) / tot
            boot = boot[tot > 0]
            # resamples that drew only images where the metric is undefined are dropped, counted
            entry["n_resamples_used"] = int(boot.size)
            entry["n_resamples_undefined"] = int(n_resamples - boot.size)
            if boot.size:
                lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
                entry["low"], entry["high"] = float(lo), float(hi)
        out[name] = entry
    return out


# ----------------------------------------------------------------------------- references

def area_fraction(masks) -> dict:
    """Share of the crop inside the regions, over images: ``{"mean", "min", "max", "n"}``."""
    g, _ = _batch(np.asarray(masks).astype(bool), "masks")
    frac = g.mean(axis=(1, 2)) if g.shape[0] else np.zeros(0)
    if not frac.size:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(frac.mean()), "min": float(frac.min()), "max": float(frac.max()),
            "n": int(frac.size)}


def reference_maps(masks, images=None, seed: int = 0) -> dict:
    """The trivial maps of :data:`REFERENCE_MAPS` in the geometry of ``masks`` [B, H, W], each
    min-max normalised like an attention map. ``images`` [B, H, W] grey levels (the crop the
    model saw, any scale) give the intensity maps; without images they are left out. The area
    prior needs at least two images (leave-one-out). Returns ``{name: maps [B, H, W]}``."""
    g, _ = _batch(np.asarray(masks).astype(bool), "masks")
    B = g.shape[0]
    out = {"ref:uniform_random": np.random.default_rng(seed).random(g.shape).astype(np.float32)}
    if B >= 2:
        total = g.sum(axis=0, dtype=np.float64)
        out["ref:area_prior"] = normalize_map((total[None] - g) / (B - 1))
    if images is not None:
        im, _ = _batch(np.asarray(images, dtype=np.float32), "images")
        if im.shape != g.shape:
            raise ValueError(f"images and masks shapes differ: {im.shape} vs {g.shape}")
        bright = normalize_map(im)
        out["ref:intensity_bright"] = bright
        out["ref:intensity_dark"] = normalize_map(1.0 - bright)
    return out


def localization_references(masks, images=None, rule: str = "fixed", t: float = 0.5,
                            seed: int = 0, n_resamples: int = 1000) -> dict:
    """:func:`localization_summary` of every reference map (same rule, threshold, bootstrap
    seed and images as the model's maps) and the regions' area fraction::

        {"area_fraction": {...}, "references": {name: summary without per_image},
         "definitions": {name: text}}
    """
    maps = reference_maps(masks, images, seed)
    refs = {}
    for name, m in maps.items():
        summary = localization_summary(m, masks, rule=rule, t=t, seed=seed, n_resamples=n_resamples)
        refs[name] = {k: v for k, v in summary.items() if k != "per_image"}
    return {"area_fraction": area_fraction(masks), "references": refs,
            "definitions": {k: REFERENCE_MAPS[k] for k in maps}}
