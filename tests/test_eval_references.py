"""Reference rows of the evaluation (issue 12): localization references on hand-made maps,
teachers and oracle ceilings evaluated like students, signal-label macros, the console table."""
from __future__ import annotations

import numpy as np
import pytest

from kdscale.eval.localization import (area_fraction, localization_references, reference_maps)


def _three_images():
    """4x4 images: regions top-left 2x2 (images 0, 1) and bottom-right 2x2 (image 2)."""
    g = np.zeros((3, 4, 4), bool)
    g[0, :2, :2] = g[1, :2, :2] = True
    g[2, 2:, 2:] = True
    return g


def test_area_fraction_and_leave_one_out_prior_by_hand():
    g = _three_images()
    assert area_fraction(g) == {"mean": 0.25, "min": 0.25, "max": 0.25, "n": 3}
    maps = reference_maps(g, seed=0)
    # image 0 sees the mean of images 1 and 2: both squares at 0.5 -> normalised to 1
    assert np.array_equal(maps["ref:area_prior"][0] == 1, g[1] | g[2])
    # image 2 sees only the top-left squares of images 0 and 1, never its own box
    assert np.array_equal(maps["ref:area_prior"][2] == 1, g[0])
    assert "ref:intensity_bright" not in maps                  # no images given
    out = localization_references(g, seed=0, n_resamples=50)["references"]["ref:area_prior"]
    # IoU 4/8, 4/8, 0; FPR 4/12 each; pointing (argmax = first pixel (0, 0)) 1, 1, 0;
    # pixel AUROC: image 0 = 8/12 + 0.5 * 4/12 = 10/12, image 2 = 0.5 * 8/12 = 4/12
    assert out["iou"]["mean"] == pytest.approx(1 / 3)
    assert out["fpr_pixel"]["mean"] == pytest.approx(1 / 3)
    assert out["pointing_game"]["mean"] == pytest.approx(2 / 3)
    assert out["detection_auroc"]["mean"] == pytest.approx((10 + 10 + 4) / 36)
    assert out["iou"]["low"] <= out["iou"]["mean"] <= out["iou"]["high"]


def test_intensity_and_random_references_by_hand():
    g = _three_images()
    images = g * 0.8 + 0.1                                     # the regions are the bright part
    ref = localization_references(g, images, seed=3, n_resamples=50)
    bright, dark = ref["references"]["ref:intensity_bright"], ref["references"]["ref:intensity_dark"]
    assert bright["iou"]["mean"] == 1 and bright["pointing_game"]["mean"] == 1
    assert bright["fpr_pixel"]["mean"] == 0 and bright["detection_auroc"]["mean"] == 1
    assert dark["iou"]["mean"] == 0 and dark["pointing_game"]["mean"] == 0
    assert dark["fpr_pixel"]["mean"] == 1 and dark["detection_auroc"]["mean"] == 0
    assert ref["area_fraction"]["mean"] == 0.25
    assert set(ref["definitions"]) == {"ref:uniform_random", "ref:area_prior",
                                       "ref:intensity_bright", "ref:intensity_dark"}
    a = reference_maps(g, images, seed=3)["ref:uniform_random"]
    assert np.array_equal(a, reference_maps(g, images, seed=3)["ref:uniform_random"])
    assert not np.array_equal(a, reference_maps(g, images, seed=4)["ref:uniform_random"])
    # a fixed threshold of 0.5 on uniform noise activates about half the pixels
    rnd = localization_references(np.ones((50, 8, 8), bool) & (np.arange(8) < 4)[None, None],
                                  seed=0, n_resamples=20)["references"]["ref:uniform_random"]
    assert rnd["fpr_pixel"]["mean"] == pytest.approx(0.5, abs=0.05)
    assert rnd["detection_auroc"]["mean"] == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="shapes differ"):
        reference_maps(g, images[:, :3])
