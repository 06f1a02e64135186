"""How much an image student looks at, and reacts to, the demo's shortcut marker.

The MIMIC demo films (kdscale/data/mimic_demo_images.py) carry a bright 'P' marker in the top-right
corner; in the train split it follows the findings (80% of films with a finding, 15% without), in
val/test it appears on 35% of films regardless of findings. A student that learnt the shortcut
puts attention on the marker and predicts higher when it is drawn. Reported per run (JSON
``<run>/eval/<student>/<split>/shortcut.json``):

* ``marker_share``: the share of each attention map's mass inside the marker box, averaged over
  the test films (``_marked`` / ``_unmarked``: over films with / without a drawn marker);
* ``area_share``: the box's share of the image: what a uniform map would put there;
* ``prob_gap``: mean predicted probability (over labels) on marked minus unmarked films. In the
  test split the marker is independent of the findings, so a gap is the shortcut's effect.

When the loader's resize + centre crop cuts the marker away (e.g. the demo's 144 -> 128 crop of a
256 x 320 film) ``marker_visible`` is false and nothing is measured: the shortcut cannot act.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdscale.data.loader import build_loader
from kdscale.data.mimic_demo_images import HEIGHT, WIDTH
from kdscale.data.shards import shards_out_dir
from kdscale.distill.student_training import build_task, load_student, student_dir, student_loader_config
from kdscale.eval.attention import grad_cam, vit_attention_maps
from kdscale.eval.localization import boxes_to_mask, transform_boxes, upsample
from kdscale.eval.run_eval import _ImageLogits, _denormalize
from kdscale.io.atomic import write_json_atomic

# draw_film: _marker(img, "P", WIDTH - 20, 8, 255.0), a 10 x 14 block letter: (x, y, w, h) in
# film pixels. tests/test_shortcut.py draws films with and without it and checks the difference
# lies in this box, so a change of the generator is caught.
MARKER_BOX = (WIDTH - 20.0, 8.0, 10.0, 14.0)
FILM_SIZE = (WIDTH, HEIGHT)
MARKED_THRESHOLD = 0.75   # of the denormalised grey value (the marker is 255, the corner ~0.1)


def attention_share(maps, region) -> np.ndarray:
    """Share of each map's mass inside ``region``: ``sum(map * region) / sum(map)`` per image.

    ``maps`` [B, H, W] (or [H, W]) non-negative; ``region`` bool [H, W] (or [B, H, W]). NaN for a
    map with no mass. Negative values are an error (the share of a signed map is meaningless)."""
    m = np.asarray(maps, dtype=np.float64)
    single = m.ndim == 2
    m = m[None] if single else m
    r = np.asarray(region, dtype=bool)
    if r.shape != m.shape[-2:] and r.shape != m.shape:
        raise ValueError(f"region shape {r.shape} does not match maps {m.shape}")
    if (m < 0).any():
        raise ValueError("attention maps must be non-negative to take a share of their mass")
    total = m.sum(axis=(-2, -1))
    inside = (m * r).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)
    return share[0] if single else share


def marker_region(resize_size: Optional[int], image_size: int) -> np.ndarray:
    """The marker box as a bool [image_size, image_size] mask after the loader's eval transform
    (Resize(resize_size) + CenterCrop(image_size)); all False when the crop cuts it away."""
    moved, _ = transform_boxes(np.array([MARKER_BOX]), FILM_SIZE, resize_size, image_size)
    return boxes_to_mask(moved, (image_size, image_size))


def marker_drawn(images, region: np.ndarray, threshold: float = MARKED_THRESHOLD) -> np.ndarray:
    """Which images (denormalised grey [B, H, W] in [0, 1]) show the marker: the brightest pixel
    inside the marker region exceeds ``threshold``."""
    x = np.asarray(images, dtype=np.float64)
    if not region.any():
        return np.zeros(len(x), dtype=bool)
    return x[:, region].max(axis=1) > threshold


def summarize(shares: np.ndarray, marked: np.ndarray, probs: np.ndarray, area_share: float) -> dict:
    """The JSON summary of per-image shares, marker flags and mean predicted probabilities."""
    def mean(v):
        v = v[~np.isnan(v)]
        return float(v.mean()) if v.size else None

    gap = None
    if marked.any() and (~marked).any():
        gap = float(probs[marked].mean() - probs[~marked].mean())
    return {"n": int(len(shares)), "n_marked": int(marked.sum()), "area_share": float(area_share),
            "marker_share": mean(shares), "marker_share_marked": mean(shares[marked]),
            "marker_share_unmarked": mean(shares[~marked]), "prob_gap": gap}


# ---------------------------------------------------------------------------------------------
# One student on a split
# ---------------------------------------------------------------------------------------------

def evaluate_shortcut(cfg, student, split: Optional[str] = None) -> dict:
    """Attention share on the marker, and the marked - unmarked prediction gap, of an image
    student (ViT: last-layer CLS attention; CNN: Grad-CAM) on every test film with an image."""
    split = split or cfg.eval.split
    model, info = load_student(student_dir(cfg, student) / "student.pt")
    task = build_task(student, info["ensemble_names"], info["task"], info["label_names"])
    loader_cfg = dataclasses.replace(student_loader_config(cfg, student), drop_last=False, num_workers=0)
    size = loader_cfg.image_size
    region = marker_region(loader_cfg.resize_size, size)
    out = Path(cfg.run.out_dir) / "eval" / student.name / split / "shortcut.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"student": student.name, "split": split, "marker_box_film": list(MARKER_BOX),
              "image_size": size, "resize_size": loader_cfg.resize_size, "marker_visible": bool(region.any())}
    if not region.any():
        result["summary"] = {"area_share": 0.0}
        write_json_atomic(out, result)
        return result
    loader = build_loader(shards_out_dir(cfg), split, loader_cfg, train=False, rank=0, world_size=1)
    kind = info["model_config"].kind
    shares, marked, probs = [], [], []
    for batch in loader:
        sel = [i for i, v in enumerate(batch["valid"].tolist()) if v and batch["present"]["image"][i]]
        if not sel:
            continue
        images = batch["image"][sel]
        if kind == "vit":
            with torch.inference_mode():
                maps = upsample(vit_attention_maps(model.vit, images, method="cls_last"), size)
        else:
            backbone = model.model.encoder.backbone
            maps = grad_cam(_ImageLogits(model), backbone.layer4, images)
        shares.append(attention_share(np.clip(maps, 0, None), region))
        grey = np.stack([_denormalize(batch["image"][i], loader_cfg) for i in sel])
        grey = grey.mean(axis=-1) if grey.ndim == 4 else grey
        marked.append(marker_drawn(grey, region))
        with torch.inference_mode():
            p, _ = task.predict(model, batch)[task.main_head]
        probs.append(p.float().numpy()[sel].mean(axis=1))
    if hasattr(loader, "close"):
        loader.close()
    s, mk, pr = (np.concatenate(v) for v in (shares, marked, probs))
    result["summary"] = summarize(s, mk, pr, float(region.mean()))
    write_json_atomic(out, result)
    return result
