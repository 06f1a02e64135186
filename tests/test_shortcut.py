"""kdscale.eval.shortcut: attention share on the demo's shortcut marker (hand-made maps) and the
marker geometry checked against the demo generator itself."""
import io

import numpy as np
import pytest
from PIL import Image

from kdscale.eval.shortcut import (MARKER_BOX, attention_share, marker_drawn, marker_region,
                                   summarize)


def test_attention_share_hand_computed():
    region = np.zeros((4, 4), bool)
    region[0, 2:] = True                       # 2 of 16 pixels
    uniform = np.ones((4, 4))
    peaked = np.zeros((4, 4))
    peaked[0, 3] = 3.0
    peaked[3, 0] = 1.0                         # 3 of 4 units of mass inside
    empty = np.zeros((4, 4))
    got = attention_share(np.stack([uniform, peaked, empty]), region)
    assert got[0] == pytest.approx(2 / 16)
    assert got[1] == pytest.approx(0.75)
    assert np.isnan(got[2])
    assert attention_share(peaked, region) == pytest.approx(0.75)   # a single map


def test_attention_share_rejects_signed_and_misshaped_maps():
    with pytest.raises(ValueError, match="non-negative"):
        attention_share(-np.ones((2, 2)), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="shape"):
        attention_share(np.ones((2, 3, 3)), np.ones((2, 2), bool))


def _film(shortcut: bool) -> np.ndarray:
    from kdscale.data.mimic_demo_images import draw_film

    data, _ = draw_film(np.random.default_rng(7), [], lateral=False, shortcut=shortcut, quality=100)
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)


def test_marker_box_matches_the_generator():
    """Films drawn from the same random state with and without the marker differ only inside
    MARKER_BOX (JPEG ringing allowed one pixel around it)."""
    diff = np.abs(_film(True) - _film(False)) > 40
    ys, xs = np.nonzero(diff)
    x, y, w, h = MARKER_BOX
    assert diff.sum() > 50
    assert xs.min() >= x - 1 and xs.max() <= x + w and ys.min() >= y - 1 and ys.max() <= y + h


def test_marker_region_after_the_loader_transform():
    # the demo's eval transform (Resize 144, CenterCrop 128 of a 256 x 320 film) crops the marker away
    assert not marker_region(144, 128).any()
    # Resize 128 (-> 128 x 160) + CenterCrop 160 pads 16 px left/right and keeps every row:
    # the box (236, 8, 10, 14) * 0.5 + (16, 0) = (134, 4, 5, 7)
    region = marker_region(128, 160)
    ys, xs = np.nonzero(region)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (134, 138, 4, 10)


def test_marker_drawn_through_the_eval_transform():
    from kdscale.data.loader import LoaderConfig
    from kdscale.data.transforms import build_image_transform

    cfg = LoaderConfig(image_size=160, resize_size=128)
    tf = build_image_transform(cfg, train=False, to_tensor=False)
    region = marker_region(128, 160)
    grey = [np.asarray(tf(Image.fromarray(_film(s).astype(np.uint8))), dtype=np.float64) / 255.0
            for s in (True, False)]
    assert marker_drawn(np.stack(grey), region).tolist() == [True, False]
    assert not marker_drawn(np.stack(grey), np.zeros((160, 160), bool)).any()


def test_summarize():
    shares = np.array([0.5, 0.1, np.nan, 0.3])
    marked = np.array([True, False, False, True])
    probs = np.array([0.9, 0.2, 0.4, 0.7])
    s = summarize(shares, marked, probs, area_share=0.01)
    assert s["n"] == 4 and s["n_marked"] == 2
    assert s["marker_share"] == pytest.approx(0.3)
    assert s["marker_share_marked"] == pytest.approx(0.4)
    assert s["marker_share_unmarked"] == pytest.approx(0.1)
    assert s["prob_gap"] == pytest.approx(0.8 - 0.3)
