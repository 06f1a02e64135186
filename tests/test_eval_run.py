"""Ground truth for attention-map localization from stored region masks (kdscale.eval.run_eval):
hand-computed on a tiny canvas, and on the REAL covid-cxr-seg masks."""
from __future__ import annotations

import io

import numpy as np
import pytest
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


@pytest.mark.slow
def test_predictions_record_stored_presence_and_manifest_demographics(shared_data, tmp_path):
    """Issue 16 findings 1 and 6 on the REAL covid-cxr-seg data: an image student never loads
    the notes or the tabular fields, yet predictions.csv must say which samples have them; the
    manifest's sex / age meta (strings such as '65' in shards) must give real subgroups."""
    import csv

    from kdscale.data.loader import build_loader
    from kdscale.data.shards import build_shards, shards_out_dir
    from kdscale.distill.tasks import SupervisedImageTask
    from kdscale.eval.analysis import subgroups
    from kdscale.eval.predictions import read_predictions, write_predictions
    from kdscale.eval.run_eval import predict_split
    from kdscale.models.students import StudentConfig, build_student
    from kdscale.schema import load_config

    cfg = load_config("configs/data/covid_cxr_seg.yaml", [f"run.out_dir={tmp_path}", "loader.num_workers=0",
                                                          "loader.image_size=32", "loader.resize_size=32",
                                                          "loader.modalities=[image]"])
    build_shards(cfg, workers=1)
    n_labels = 3
    model = build_student(StudentConfig(kind="unimodal", modality="image", image_arch="resnet10"), n_labels)
    totals = {"n": 0, "report": 0, "tabular": 0, "image": 0, "age": 0, "sex": 0}
    for split in ("train", "val", "test"):
        loader = build_loader(shards_out_dir(cfg), split, cfg.loader, train=False, rank=0, world_size=1)
        preds = predict_split(model, SupervisedImageTask(), loader, ["full"], seed=0)["full"]
        write_predictions(tmp_path / f"{split}.csv", preds)
        back = read_predictions(tmp_path / f"{split}.csv")
        totals["n"] += back.n
        for m in ("report", "tabular", "image"):
            totals[m] += int(back.present[m].sum())
        totals["age"] += int(np.isfinite(back.meta["age"]).sum())
        totals["sex"] += sum(v in ("F", "M") for v in back.meta["sex"])
        if split == "train":
            sg = subgroups(back, "image", n_boot=5, min_group_size=5)
            assert set(sg["attributes"]["sex"]["groups"]) >= {"F", "M"}
            assert len(set(sg["attributes"]["age_band"]["groups"]) - {"unknown"}) >= 2
    # the truth, from the CSV itself: rows whose image is in images/
    images = {p.name for p in (shared_data / "covid-cxr-seg" / "images").iterdir()}
    with open(shared_data / "covid-cxr-seg" / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["filename"] in images]

    def number(text):
        try:
            return float(text)
        except ValueError:
            return None

    assert totals["n"] == totals["image"] == len(rows) == 100
    assert totals["report"] == sum(bool(r["clinical_notes"].strip()) for r in rows) == 99
    assert totals["tabular"] > 0
    assert totals["age"] == sum(number(r["age"]) is not None for r in rows) > 50
    assert totals["sex"] == sum(r["sex"].strip() in ("F", "M") for r in rows) > 50
