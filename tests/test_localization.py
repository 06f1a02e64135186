"""kdscale.eval.localization: hand-computed geometry and scores."""
from __future__ import annotations

import numpy as np
import pytest

from kdscale.eval.localization import (binarize, boxes_to_mask, detection_auroc, fpr_area,
                                       fpr_pixel, iou, localization_summary, normalize_map,
                                       pointing_game, scale_boxes, transform_boxes, upsample)


def _square(shape, r0, c0, size, value=1.0):
    m = np.zeros(shape)
    m[r0:r0 + size, c0:c0 + size] = value
    return m


def test_boxes_to_mask_pixel_rule_and_clipping():
    m = boxes_to_mask([(1, 2, 3, 4)], (10, 10))            # cols 1..3, rows 2..5
    assert m.sum() == 12 and m[2:6, 1:4].all()
    m = boxes_to_mask([(1.4, 1.6, 2.2, 1.0)], (5, 5))     # round half up: cols 1..3, row 2
    assert m.sum() == 3 and m[2, 1:4].all()
    m = boxes_to_mask([(8, 8, 5, 5), (0, 0, 1, 1)], (10, 10))  # clipped + union
    assert m.sum() == 4 + 1
    assert boxes_to_mask([], (4, 4)).sum() == 0


def test_iou_and_fprs_of_two_overlapping_squares():
    # map: 4x4 square at (2, 2); ground truth: 4x4 square at (4, 4), in a 10x10 image
    # TP = 2x2 = 4, FP = 16 - 4 = 12, FN = 12, TN = 100 - 28 = 72
    m = _square((10, 10), 2, 2, 4)
    g = _square((10, 10), 4, 4, 4).astype(bool)
    assert iou(m, g) == pytest.approx(4 / 28)
    assert fpr_pixel(m, g) == pytest.approx(12 / 84)
    assert fpr_area(m, g) == pytest.approx(12 / 16)
    # batch form and top_percent binarisation: top 16% of 100 pixels = the 16 map pixels
    b = np.stack([m, m * 0.7])
    np.testing.assert_allclose(iou(b, np.stack([g, g]), rule="top_percent", t=16), [4 / 28] * 2)
    assert np.isnan(fpr_area(np.zeros((10, 10)), g))      # nothing activated
    assert np.isnan(iou(np.zeros((3, 3)), np.zeros((3, 3), bool)))


def test_binarize_rules():
    m = np.arange(100, dtype=float).reshape(10, 10) / 99
    assert binarize(m, "fixed", 0.5).sum() == 50
    top = binarize(m, "top_percent", 10)
    assert top.sum() == 10 and top[9].all()
    assert binarize(m, "top_percent", 0.5).sum() == 1      # at least one pixel
    assert binarize(np.zeros((4, 4)), "top_percent", 25).sum() == 16  # ties all kept
    with pytest.raises(ValueError):
        binarize(m, "top_percent", 0)


def test_pointing_game_hit_miss_tolerance():
    g = np.zeros((10, 10), bool)
    g[5, 3:6] = True
    hit = np.zeros((10, 10))
    hit[5, 4] = 1
    miss = np.zeros((10, 10))
    miss[5, 0] = 1                                         # 3 px left of the box
    assert pointing_game(hit, g) == 1.0
    assert pointing_game(miss, g) == 0.0
    assert pointing_game(miss, g, tolerance_px=2.9) == 0.0
    assert pointing_game(miss, g, tolerance_px=3) == 1.0
    diag = np.zeros((10, 10))
    diag[2, 0] = 1                                         # distance to (5, 3) = sqrt(18) = 4.24
    assert pointing_game(diag, g, tolerance_px=4.2) == 0.0
    assert pointing_game(diag, g, tolerance_px=4.25) == 1.0
    np.testing.assert_array_equal(pointing_game(np.stack([hit, miss]), np.stack([g, g])), [1, 0])
    assert np.isnan(pointing_game(hit, np.zeros_like(g)))


def test_detection_auroc():
    g = _square((8, 8), 2, 2, 3).astype(bool)
    assert detection_auroc(g.astype(float), g) == 1.0
    assert detection_auroc(1.0 - g, g) == 0.0
    assert detection_auroc(np.full((8, 8), 0.3), g) == 0.5
    assert np.isnan(detection_auroc(g.astype(float), np.zeros_like(g)))
    rng = np.random.default_rng(0)
    m = rng.random((8, 8))
    from sklearn.metrics import roc_auc_score
    assert detection_auroc(m, g) == pytest.approx(roc_auc_score(g.ravel(), m.ravel()))


def test_transform_boxes_resize_and_center_crop_arithmetic():
    # 512 x 256 (width x height) image, Resize(256): the shorter side (height) is already 256,
    # so the size stays 512 x 256 (scale 1). CenterCrop(224): left = round((512 - 224) / 2) = 144,
    # top = round((256 - 224) / 2) = 16. Boxes shift by (-144, -16) and are clipped to [0, 224].
    boxes = [(100, 10, 100, 50),     # x: 100-144 = -44 -> 0 .. 200-144 = 56; y: -6 -> 0 .. 44
             (300, 100, 40, 40),     # inside: (156, 84, 40, 40)
             (10, 10, 50, 50),       # x1 = 60 - 144 < 0: fully outside -> dropped
             (350, 200, 100, 100)]   # x 206 .. 306 -> 224 (w 18); y 184 .. 284 -> 224 (h 40)
    out, dropped = transform_boxes(boxes, (512, 256), 256, 224)
    np.testing.assert_allclose(out, [[0, 0, 56, 44], [156, 84, 40, 40], [206, 184, 18, 40]])
    assert dropped == 1
    # 1024 x 512 halves first (scale 0.5), then the same crop
    out2, _ = transform_boxes([(200, 20, 200, 100)], (1024, 512), 256, 224)
    np.testing.assert_allclose(out2, [[0, 0, 56, 44]])
    # portrait 400 x 600: Resize(256) -> 256 x int(256 * 600 / 400) = 256 x 384,
    # crop left = 16, top = 80; box (100, 300, 40, 60) * 0.64 = (64, 192, 25.6, 38.4)
    out3, _ = transform_boxes([(100, 300, 40, 60)], (400, 600), 256, 224)
    np.testing.assert_allclose(out3, [[48, 112, 25.6, 38.4]])
    # scale_boxes: MIMIC-CXR's width-512 offline resize of a 2000 x 2500 image
    np.testing.assert_allclose(scale_boxes([(1000, 500, 200, 400)], (2000, 2500), (512, 640)),
                               [[256, 128, 51.2, 102.4]])


def test_transform_boxes_agrees_with_torchvision_geometry():
    import torch
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    W0, H0 = 600, 450
    boxes = [(80, 60, 150, 90), (400, 300, 120, 140), (5, 200, 40, 40)]
    img = torch.from_numpy(boxes_to_mask(boxes, (H0, W0)).astype(np.float32))[None]
    ref = CenterCrop(224)(Resize(256, interpolation=InterpolationMode.NEAREST)(img))[0] > 0.5
    out, dropped = transform_boxes(boxes, (W0, H0), 256, 224)
    mine = boxes_to_mask(out, (224, 224))
    inter = (mine & ref.numpy()).sum()
    union = (mine | ref.numpy()).sum()
    assert dropped == 1                                    # the left-edge box is cropped away
    assert inter / union > 0.97


def test_normalize_and_upsample():
    m = np.array([[1.0, 3.0], [5.0, 9.0]])
    n = normalize_map(m)
    assert n.min() == 0 and n.max() == 1 and n[0, 1] == pytest.approx(0.25)
    np.testing.assert_array_equal(normalize_map(np.full((3, 3), 7.0)), np.zeros((3, 3)))
    b = normalize_map(np.stack([m, np.full((2, 2), 2.0)]))
    assert b.shape == (2, 2, 2) and b[1].max() == 0
    up = upsample(m, 4)
    assert up.shape == (4, 4) and up.dtype == np.float32
    assert up[0, 0] == pytest.approx(1.0) and up[3, 3] == pytest.approx(9.0)   # edges clamp
    assert upsample(np.stack([m, m]), (6, 8)).shape == (2, 6, 8)
    np.testing.assert_allclose(upsample(np.full((3, 3), 0.4), 12), 0.4, rtol=1e-6)


def test_localization_summary():
    rng = np.random.default_rng(0)
    masks = np.stack([_square((16, 16), r, c, 5).astype(bool)
                      for r, c in rng.integers(0, 11, (20, 2))])
    maps = np.clip(masks * 0.6 + rng.random(masks.shape) * 0.5, 0, 1)
    maps[0] = 0.0                                         # nothing activated: fpr_area undefined
    out = localization_summary(maps, masks, rule="fixed", t=0.5, seed=1, n_resamples=500)
    assert out["n_images"] == 20 and out["t"] == 0.5 and out["rule"] == "fixed"
    for name in ("iou", "fpr_pixel", "fpr_area", "pointing_game", "detection_auroc"):
        e = out[name]
        assert e["low"] <= e["mean"] <= e["high"], name
        assert e["mean"] == pytest.approx(np.nanmean(out["per_image"][name]))
    assert out["fpr_area"]["n"] == 19 and out["iou"]["n"] == 20
    assert out["iou"]["mean"] == pytest.approx(np.mean(iou(maps, masks)))
    again = localization_summary(list(maps), list(masks), rule="fixed", t=0.5, seed=1,
                                 n_resamples=500)
    assert again["iou"] == out["iou"]
    top = localization_summary(maps, masks, rule="top_percent", t=10, n_resamples=100)
    assert top["rule"] == "top_percent" and 0 <= top["iou"]["mean"] <= 1


# ----------------------------------------------------------------------------- letterbox (issue 16, finding 10)

def test_transform_boxes_through_pad_to_square_arithmetic():
    from kdscale.data.transforms import letterbox_geometry

    assert letterbox_geometry(512, 256) == (512, 0, 128)
    assert letterbox_geometry(301, 400) == (400, 49, 0)        # odd padding: the extra pixel right
    # 512 x 256 padded to 512 x 512 (top 128); Resize(256): scale 0.5; CenterCrop(224): offset 16.
    # (100, 10, 100, 50) -> (100, 138, 100, 50) -> (50, 69, 50, 25) -> (34, 53, 50, 25)
    # The box at x = 10 that the plain crop drops survives the letterbox: (5, 9, 25, 25) - 16 -> clipped
    out, dropped = transform_boxes([(100, 10, 100, 50), (10, 10, 50, 50)], (512, 256), 256, 224,
                                   pad_to_square=True)
    np.testing.assert_allclose(out, [[34, 53, 50, 25], [0, 53, 14, 25]])
    assert dropped == 0
    plain, plain_dropped = transform_boxes([(10, 10, 50, 50)], (512, 256), 256, 224)
    assert plain_dropped == 1 and len(plain) == 0
    # a square image is unchanged by the letterbox
    np.testing.assert_allclose(transform_boxes([(3, 4, 5, 6)], (300, 300), 256, 224, pad_to_square=True)[0],
                               transform_boxes([(3, 4, 5, 6)], (300, 300), 256, 224)[0])


@pytest.mark.parametrize("size", [(600, 450), (450, 600), (301, 200)])
def test_letterboxed_boxes_agree_with_the_loader_transform(size):
    """Boxes drawn into an image and sent through the loader's own eval transform
    (PadToSquare -> Resize -> CenterCrop) land where transform_boxes puts them."""
    from types import SimpleNamespace

    from PIL import Image

    from kdscale.data.transforms import build_image_transform

    W0, H0 = size
    boxes = [(20, 30, W0 // 4, H0 // 5), (W0 // 2, H0 // 2, W0 // 3, H0 // 3), (2, H0 - 50, 30, 40)]
    img = Image.fromarray(boxes_to_mask(boxes, (H0, W0)).astype(np.uint8) * 255, mode="L")
    cfg = SimpleNamespace(pad_to_square=True, resize_size=224, image_size=224, augment="none")
    out_img = np.asarray(build_image_transform(cfg, train=False, to_tensor=False)(img)) > 127
    assert out_img.shape == (224, 224)
    moved, dropped = transform_boxes(boxes, (W0, H0), 224, 224, pad_to_square=True)
    mine = boxes_to_mask(moved, (224, 224))
    assert dropped == 0                               # letterbox + crop of the same size keeps all
    assert (mine & out_img).sum() / (mine | out_img).sum() > 0.9
    # the padding is black and outside every box
    side = max(W0, H0)
    pad_rows = int((side - H0) / 2 * 224 / side) - 1
    pad_cols = int((side - W0) / 2 * 224 / side) - 1
    if pad_rows > 0:
        assert not out_img[:pad_rows].any() and not mine[:pad_rows].any()
    if pad_cols > 0:
        assert not out_img[:, :pad_cols].any() and not mine[:, :pad_cols].any()


def test_region_mask_ground_truth_through_the_letterbox():
    import io

    from PIL import Image

    from kdscale.eval.run_eval import ground_truth_from_masks

    # image 8 x 4 (w x h): letterbox to 8 x 8 with 2 black rows on top; Resize(8) and crop 8 keep it
    mask = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    rec = {"image_size": [8, 4], "boxes": [{"x": 2, "y": 1, "w": 3, "h": 2, "mask": "m.png"}]}
    gt = ground_truth_from_masks(rec, {"m.png": buf.getvalue()}, 8, 8, pad_to_square=True)
    expected = np.zeros((8, 8), dtype=bool)
    expected[3, 2], expected[3, 4], expected[4, 3] = True, True, True     # rows shifted down by 2
    np.testing.assert_array_equal(gt, expected)
    boxes, _ = transform_boxes([(2, 1, 3, 2)], (8, 4), 8, 8, pad_to_square=True)
    np.testing.assert_allclose(boxes, [[2, 3, 3, 2]])
    assert (gt & ~boxes_to_mask(boxes, (8, 8))).sum() == 0            # the mask lies inside its box
