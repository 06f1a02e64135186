"""Manifest source: every column kind on a hand-built CSV, bad input per case, and the REAL
covid-cxr-seg data through configs/data/covid_cxr_seg.yaml."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import missing_real_data
from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.sources import build_source
from kdscale.data.sources.base import LeakageError
from kdscale.data.sources.manifest import BoxesSpec, LabelSpec, ManifestConfig, ManifestSource
from kdscale.schema import load_config

HEADER = ["patient", "study", "split", "img", "note", "age", "sex", "hr", "ts", "diagnosis", "died", "site"]
SECRET = "SECRET-NOTE-TEXT"
DISCRETIZER = """name: tiny
channels:
  - {name: Heart Rate, type: continuous, normal_value: "80"}
  - {name: Alert, type: categorical, normal_value: "yes", values: ["yes", "no"]}
"""


def base_row(i: int, **extra) -> dict:
    row = {"patient": f"p{i}", "study": f"s{i}", "split": "train", "img": f"im{i}.png", "note": f"{SECRET} {i}",
           "age": str(40 + i), "sex": "F", "hr": "71.5", "ts": "", "diagnosis": "pneumonia", "died": "0",
           "site": "A"}
    row.update(extra)
    return row


def make_tree(root: Path, rows: list[dict], regions: list[dict] | None = None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for r in rows:
        path = root / "images" / r["img"]
        if r["img"] and not path.exists():
            Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(path)  # 30 x 20
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    with open(root / "regions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "what", "x", "y", "w", "h", "mask"])
        writer.writeheader()
        writer.writerows(regions or [])
    (root / "tiny.yaml").write_text(DISCRETIZER)
    return root


def rgba_mask(root: Path, name: str, w: int, h: int) -> str:
    """A covid-cxr-seg style mask: RGBA, alpha 255 everywhere, region = coloured pixels."""
    arr = np.zeros((h, w, 4), np.uint8)
    arr[..., 3] = 255
    arr[: h // 2, :, :3] = (255, 248, 11)
    (root / "masks").mkdir(exist_ok=True)
    Image.fromarray(arr, mode="RGBA").save(root / "masks" / name)
    return f"masks/{name}"


def config(root: Path, **overrides) -> ManifestConfig:
    kwargs = dict(
        csv=str(root / "manifest.csv"), patient_column="patient", key_columns=["study"], split_column="split",
        image_column="img", image_dir="images", require_image=True, report_column="note",
        tabular_columns=["age", "sex", "hr"], categorical_columns=["sex"],
        timeseries_column="ts", discretizer=str(root / "tiny.yaml"),
        labels=[LabelSpec(name="pneumonia", column="diagnosis", positive=["Pneumonia"], negative=["normal"]),
                LabelSpec(name="died", column="died"),
                LabelSpec(name="opacity", source="boxes", positive=["opacity"])],
        boxes=BoxesSpec(csv=str(root / "regions.csv"), join_column="file", label_column="what",
                        mask_column="mask", keep_labels=["opacity"]),
        meta_columns=["site", "age"])
    kwargs.update(overrides)
    return ManifestConfig(**kwargs)


def strict(root: Path, **overrides) -> ManifestConfig:
    """config() with whole-sample skipping for bad cells and unexpected label values."""
    labels = [LabelSpec(name="pneumonia", column="diagnosis", positive=["Pneumonia"], negative=["normal"],
                        other="skip"),
              LabelSpec(name="died", column="died", other="skip"),
              LabelSpec(name="opacity", source="boxes", positive=["opacity"])]
    return config(root, **{"on_bad_modality": "skip_sample", "labels": labels, **overrides})


def read(cfg: ManifestConfig, **log_kwargs):
    log = IngestLog("manifest", **log_kwargs)
    records = list(ManifestSource(cfg).records(log))
    assert log.read == log.kept + log.n_skipped
    return records, log


def test_every_column_kind(tmp_path):
    (tmp_path / "ts").mkdir()
    (tmp_path / "ts/p1.csv").write_text("Hours,Heart Rate,Alert\n0.5,90,no\n2.2,,yes\n")
    rows = [base_row(1, ts="ts/p1.csv", sex="", hr="NA"),
            base_row(2, split="test", diagnosis="Normal", died="1", note="  "),
            base_row(3, split="val", diagnosis="")]
    regions = [{"file": "im1.png", "what": "opacity", "x": 2, "y": 3, "w": 10, "h": 4,
                "mask": rgba_mask(tmp_path, "m1.png", 10, 4)},
               {"file": "im1.png", "what": "lung", "x": 0, "y": 0, "w": 30, "h": 20, "mask": ""},
               {"file": "im2.png", "what": "lung", "x": 0, "y": 0, "w": 30, "h": 20, "mask": ""}]
    make_tree(tmp_path, rows, regions)
    records, log = read(config(tmp_path))
    assert ManifestSource(config(tmp_path)).describe()["ehr_feature_names"] == [
        "Heart Rate", "Alert->yes", "Alert->no", "mask->Heart Rate", "mask->Alert"]
    r1, r2, r3 = records
    assert [r.key for r in records] == ["s1", "s2", "s3"] and [r.split for r in records] == ["train", "test", "val"]
    assert r1.image_size == (30, 20) and r1.report == f"{SECRET} 1"
    assert r1.tabular == {"age": 41.0, "sex": None, "hr": None}
    assert r2.tabular == {"age": 42.0, "sex": "F", "hr": 71.5}
    assert r1.ehr.shape == (3, 5) and r1.ehr[0].tolist() == [90.0, 0.0, 1.0, 1.0, 1.0] and r2.ehr is None
    assert r1.labels.tolist() == [1.0, 0.0, 1.0]
    assert r2.labels.tolist() == [0.0, 1.0, 0.0]
    assert np.isnan(r3.labels[0]) and np.isnan(r3.labels[2])  # blank diagnosis; no region rows at all
    assert r2.report is None and log.notes["report blank or empty (kept without report)"] == 1
    (box,) = r1.boxes  # "lung" is not kept, but labels may still use it
    assert (box.label, box.x, box.y, box.w, box.h) == ("opacity", 2.0, 3.0, 10.0, 4.0)
    mask = Image.open(io.BytesIO(box.mask_png))
    assert mask.mode == "L" and mask.size == (10, 4)
    assert np.asarray(mask)[:2].min() == 255 and np.asarray(mask)[2:].max() == 0
    # a meta column literally named "age" takes the age role: typed as float years for subgroups
    assert r1.meta["site"] == "A" and r1.meta["age"] == 41.0 and r1.meta["source_row"] == 2


def test_report_file_column_and_default_key(tmp_path):
    make_tree(tmp_path, [base_row(1, note="notes/1.txt"), base_row(2, note="notes/none.txt")])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/1.txt").write_text("Findings: clear.\n")
    cfg = config(tmp_path, report_column="", report_file_column="note", key_columns=[], boxes=None,
                 timeseries_column="", labels=[])
    records, log = read(cfg)     # default on_bad_modality: drop: the sample stays, without its report
    assert [r.key for r in records] == ["p1_r2", "p2_r3"] and records[0].report == "Findings: clear."
    assert records[1].report is None and records[1].image is not None and log.n_skipped == 0
    assert dict(log.dropped_modalities) == {"report: report file missing": 1}
    records, log = read(config(tmp_path, report_column="", report_file_column="note", key_columns=[],
                               boxes=None, timeseries_column="", labels=[], on_bad_modality="skip_sample"))
    assert [r.key for r in records] == ["p1_r2"] and dict(log.skipped) == {"report file missing": 1}


def test_hash_split_is_patient_level_and_deterministic(tmp_path):
    rows = [base_row(p, study=f"s{p}-{v}", split="") for p in range(30) for v in range(2)]
    make_tree(tmp_path, rows)
    cfg = config(tmp_path, split_column="", boxes=None, labels=[], timeseries_column="")
    first, _ = read(cfg)
    second, _ = read(cfg)
    split_of = {}
    for r in first:
        assert split_of.setdefault(r.patient_id, r.split) == r.split
    assert set(split_of.values()) == {"train", "val", "test"}
    assert [r.split for r in first] == [r.split for r in second]


def test_missing_image_kept_without_image_unless_required(tmp_path):
    make_tree(tmp_path, [base_row(1), base_row(2, img="")])
    (tmp_path / "images/im1.png").unlink()
    records, log = read(config(tmp_path, require_image=False, boxes=None))
    assert [r.image for r in records] == [None, None]
    assert log.notes["image file missing (kept without image)"] == 1
    records, log = read(config(tmp_path, boxes=None))
    assert records == [] and dict(log.skipped) == {"image file missing": 1, "no image": 1}


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_missing_file_or_column_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="manifest file not found.*manifest.csv"):
        read(config(tmp_path, boxes=None, timeseries_column=""))
    with pytest.raises(DataError, match="boxes file not found.*regions.csv"):
        read(config(tmp_path, timeseries_column=""))
    make_tree(tmp_path, [base_row(1)])
    with pytest.raises(DataError, match="'diagnosis_code'.*manifest.csv"):
        read(config(tmp_path, labels=[LabelSpec(name="x", column="diagnosis_code")]))
    with pytest.raises(DataError, match="'label'.*regions.csv"):
        read(config(tmp_path, boxes=BoxesSpec(csv=str(tmp_path / "regions.csv"), join_column="file")))


def _corrupt(root: Path, what: str) -> None:
    image = root / "images/im1.png"
    if what == "corrupt":
        image.write_bytes(b"not an image at all")
    elif what == "truncated":
        image.write_bytes(image.read_bytes()[:60])
    elif what == "missing":
        image.unlink()


@pytest.mark.parametrize("row_changes,damage,region,reason", [
    ({}, "corrupt", None, "corrupt image"),
    ({}, "truncated", None, "corrupt image"),
    ({}, "missing", None, "image file missing"),
    ({"hr": "nan"}, None, None, "non-finite numeric value"),
    ({"age": "-inf"}, None, None, "non-finite numeric value"),
    ({"hr": "fast"}, None, None, "non-numeric value"),
    ({"diagnosis": "flu"}, None, None, "label value outside expected set"),
    ({"died": "2"}, None, None, "label value outside expected set"),
    ({"split": "holdout"}, None, None, "unknown split value"),
    ({"patient": " "}, None, None, "missing patient id"),
    ({"ts": "ts/bad.csv"}, None, None, "unreadable time series"),
    ({"ts": "ts/absent.csv"}, None, None, "time-series file missing"),
    ({}, None, {"x": 25, "y": 0, "w": 10, "h": 5, "mask": ""}, "box outside image"),
    ({}, None, {"x": 0, "y": 0, "w": "", "h": 5, "mask": ""}, "bad box"),
    ({}, None, {"x": 0, "y": 0, "w": 4, "h": 4, "mask": "masks/garbage.png"}, "unreadable mask"),
    ({}, None, {"x": 0, "y": 0, "w": 4, "h": 4, "mask": "masks/m.png"}, "mask size differs from box"),
])
def test_bad_samples_are_counted_skips_without_patient_text(tmp_path, row_changes, damage, region, reason):
    (tmp_path / "ts").mkdir()
    (tmp_path / "ts/bad.csv").write_text("Hours,Heart Rate\n5,80\n1,81\n")  # hours decrease
    regions = []
    if region is not None:
        (tmp_path / "masks").mkdir()
        (tmp_path / "masks/garbage.png").write_bytes(b"\x89PNG broken")
        rgba_mask(tmp_path, "m.png", 6, 6)
        regions = [{"file": "im1.png", "what": "opacity", **region}]
    make_tree(tmp_path, [base_row(1, **row_changes), base_row(2)], regions)
    _corrupt(tmp_path, damage)
    quarantine = tmp_path / "out/quarantine.jsonl"
    records, log = read(strict(tmp_path), quarantine_path=quarantine)
    log.close()
    assert [r.key for r in records] == ["s2"] and dict(log.skipped) == {reason: 1}
    entry = json.loads(quarantine.read_text())
    assert entry["reason"] == reason and entry["row"] == 2 and SECRET not in quarantine.read_text()


def test_empty_report_is_a_skip_when_required(tmp_path):
    make_tree(tmp_path, [base_row(1, note=""), base_row(2)])
    records, log = read(config(tmp_path, require_report=True, boxes=None))
    assert len(records) == 1 and dict(log.skipped) == {"empty report": 1}


def test_duplicate_key_and_patient_in_two_splits(tmp_path):
    make_tree(tmp_path, [base_row(1), base_row(1, patient="p9"), base_row(2)])
    records, log = read(config(tmp_path, boxes=None))
    assert len(records) == 2 and dict(log.skipped) == {"duplicate key": 1}
    make_tree(tmp_path, [base_row(1), base_row(2, patient="p1", split="test")])
    with pytest.raises(LeakageError, match=r"patient p1 .*'train'.*'test'"):
        read(config(tmp_path, boxes=None))


def test_manifest_example_yaml_loads(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    make_tree(tmp_path, [])
    cfg = load_config("configs/data/manifest_example.yaml", [
        f"data.manifest.csv={tmp_path}/manifest.csv", f"data.manifest.root={tmp_path}",
        f"data.manifest.boxes.csv={tmp_path}/regions.csv"])
    assert cfg.data.source == "manifest" and [s.name for s in cfg.data.manifest.labels] == ["pneumonia", "died",
                                                                                           "opacity"]


# ---------------------------------------------------------------------------------------------
# The real covid-cxr-seg data
# ---------------------------------------------------------------------------------------------

def test_real_covid_cxr_seg(shared_data, repo_root, monkeypatch):
    if not (shared_data / "covid-cxr-seg").is_dir():
        missing_real_data(f"real data folder {shared_data / 'covid-cxr-seg'} is absent")
    monkeypatch.chdir(repo_root)
    cfg = load_config("configs/data/covid_cxr_seg.yaml")
    source = build_source(cfg.data)
    log = IngestLog("covid-cxr-seg")
    records = list(source.records(log))
    assert (log.read, log.kept, log.n_skipped) == (758, 100, 658)
    assert dict(log.skipped) == {"image file missing": 658}
    assert sum(r.report is not None for r in records) == 99
    labels = np.stack([r.labels for r in records])
    assert source.label_names == ["covid", "opacity", "consolidation"]
    assert np.nansum(labels, axis=0).tolist() == [65.0, 95.0, 32.0] and not np.isnan(labels).any()
    # typed demographics for the report's subgroups (issue 16.1)
    sexes = [r.meta["sex"] for r in records]
    assert (sexes.count("M"), sexes.count("F"), sexes.count(None)) == (55, 36, 9)
    ages = [r.meta["age"] for r in records if r.meta["age"] is not None]
    assert len(ages) == 83 and all(isinstance(a, float) for a in ages) and min(ages) == 12.0
    assert len({r.patient_id for r in records}) == 73 and {r.split for r in records} == {"train", "val", "test"}
    n_boxes = 0
    for r in records:
        w, h = r.image_size
        for b in r.boxes:
            n_boxes += 1
            assert 0 <= b.x and 0 <= b.y and b.x + b.w <= w and b.y + b.h <= h
            mask = np.asarray(Image.open(io.BytesIO(b.mask_png)))
            assert mask.shape == (b.h, b.w) and 0 < mask.mean() < 255
    assert n_boxes == 93 + 32 + 2 + 1
