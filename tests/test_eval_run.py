"""Ground truth for attention-map localization from stored region masks (kdscale.eval.run_eval):
hand-computed on a tiny canvas, and on the REAL covid-cxr-seg masks."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from kdscale.eval.run_eval import ground_truth_from_masks


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def test_mask_pasted_at_its_box_then_resized_and_cropped_like_the_image():
    # image 8 x 4 (w x h); Resize(4) keeps it, CenterCrop(4) keeps columns 2..5
    mask = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    rec = {"image_size": [8, 4], "boxes": [{"x": 2, "y": 1, "w": 3, "h": 2, "mask": "mask0.png"},
                                           {"x": 5, "y": 3, "w": 2, "h": 1, "mask": None}]}
    gt = ground_truth_from_masks(rec, {"mask0.png": _png(mask)}, resize_shorter=4, crop=4)
    expected = np.zeros((4, 4), dtype=bool)
    expected[1, 0], expected[1, 2], expected[2, 1] = True, True, True   # the mask's pixels, shifted by -2
    expected[3, 3] = True   # the box without a mask: its rectangle (columns 5..6 -> 3..4, cropped at 3)
    np.testing.assert_array_equal(gt, expected)


def test_real_covid_masks_are_inside_their_boxes(shared_data, tmp_path):
    from kdscale.data.loader import build_loader
    from kdscale.data.shards import build_shards, shards_out_dir
    from kdscale.eval.localization import boxes_to_mask, transform_boxes
    from kdscale.eval.run_eval import read_region_masks
    from kdscale.schema import load_config

    cfg = load_config("configs/data/covid_cxr_seg.yaml", [f"run.out_dir={tmp_path}", "loader.num_workers=0",
                                                          "loader.image_size=224", "loader.resize_size=256"])
    build_shards(cfg, workers=1)
    loader = build_loader(shards_out_dir(cfg), "test", cfg.loader, train=False, rank=0, world_size=1)
    region = read_region_masks(loader)
    assert region, "covid-cxr-seg ships region masks"
    checked = 0
    for batch in loader:
        for rec in batch["meta"]:
            if rec["key"] not in region or not rec["boxes"]:
                continue
            gt = ground_truth_from_masks(rec, region[rec["key"]], 256, 224)
            boxes = np.array([[b["x"], b["y"], b["w"], b["h"]] for b in rec["boxes"]])
            moved, _ = transform_boxes(boxes, tuple(rec["image_size"]), 256, 224)
            box_gt = boxes_to_mask(moved, (224, 224))
            assert gt.any()
            # a mask lies inside its box (allow the 1-pixel rounding of nearest resizing)
            assert (gt & ~box_gt).sum() <= 0.02 * gt.sum() + 224
            assert gt.sum() <= box_gt.sum() * 1.02 + 224
            checked += 1
    assert checked >= 5
