"""Issue 13.1 / 13.4: every path a source reads stays under its data root (``../``, absolute and
symlink escapes for image, report, time-series and mask paths; CBIS and MIMIC paths too), and
ambiguous CSVs (duplicate column names, a manifest without rows) are errors naming the file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.record import RecordError
from kdscale.data.sources.base import OUTSIDE_ROOT, open_csv, resolve_under_root
from kdscale.data.sources.manifest import BoxesSpec

from test_manifest_source import base_row, config, make_tree, read, rgba_mask

SECRET = "TOP-SECRET-OUTSIDE-THE-ROOT"


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    Image.fromarray(np.full((20, 30, 3), 9, np.uint8)).save(out / "secret.png")
    (out / "secret.txt").write_text(SECRET)
    (out / "secret.csv").write_text("Hours,Heart Rate\n0.5,99\n")
    rgba_mask(out, "mask.png", 4, 4)                         # outside/masks/mask.png
    return out


# what -> (row changes, region, cfg overrides) for a cell value `v`
def _case(kind: str, v: str):
    if kind == "image":
        return {"img": v}, [], {"boxes": None, "timeseries_column": ""}
    if kind == "report":
        return {"note": v}, [], {"boxes": None, "timeseries_column": "", "report_column": "",
                                 "report_file_column": "note"}
    if kind == "time-series":
        return {"ts": v}, [], {"boxes": None}
    region = {"file": "im1.png", "what": "opacity", "x": 0, "y": 0, "w": 4, "h": 4, "mask": v}
    return {}, [region], {"timeseries_column": ""}


TARGET = {"image": "secret.png", "report": "secret.txt", "time-series": "secret.csv", "mask": "masks/mask.png"}
# the folder a cell is relative to: images/ for images (image_dir), the root for the others
DEPTH = {"image": "../../", "report": "../", "time-series": "../", "mask": "../"}


@pytest.mark.parametrize("kind", ["image", "report", "time-series", "mask"])
@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_manifest_path_escapes_are_counted_skips(tmp_path, kind, escape):
    outside = _outside(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    if escape == "dotdot":
        value = DEPTH[kind] + "outside/" + TARGET[kind]
    elif escape == "absolute":
        value = str(outside / TARGET[kind])
    else:                          # a symlink inside the tree pointing out of it
        folder = root / ("images" if kind == "image" else "links")
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(outside / TARGET[kind], folder / ("link" + Path(TARGET[kind]).suffix))
        value = ("" if kind == "image" else "links/") + "link" + Path(TARGET[kind]).suffix
    changes, regions, overrides = _case(kind, value)
    if kind == "image":
        good = {}
    elif kind == "report":
        (root / "notes").mkdir()
        (root / "notes/ok.txt").write_text("fine")
        good = {"note": "notes/ok.txt"}
    else:
        good = {}
    make_tree(root, [base_row(1, **changes), base_row(2, **good)], regions)
    quarantine = tmp_path / "q.jsonl"
    records, log = read(config(root, **overrides), quarantine_path=quarantine)
    log.close()
    assert [r.key for r in records] == ["s2"] and dict(log.skipped) == {OUTSIDE_ROOT: 1}
    entry = json.loads(quarantine.read_text())
    assert entry["reason"] == OUTSIDE_ROOT and entry["row"] == 2
    text = quarantine.read_text() + json.dumps([r.metadata_json() for r in records], default=str)
    assert SECRET not in text and all(SECRET not in (r.report or "") for r in records)
    with pytest.raises(DataError, match=OUTSIDE_ROOT):       # on_bad_sample: error
        read(config(root, **overrides), on_bad_sample="error")


def test_absolute_paths_only_when_allowed(tmp_path):
    outside = _outside(tmp_path)
    root = tmp_path / "data"
    make_tree(root, [base_row(1, img=str(outside / "secret.png"), note=str(outside / "secret.txt"))])
    cfg = dict(boxes=None, timeseries_column="", report_column="", report_file_column="note")
    records, log = read(config(root, **cfg))
    assert records == [] and dict(log.skipped) == {OUTSIDE_ROOT: 1}
    records, log = read(config(root, allow_absolute_paths=True, **cfg))
    assert len(records) == 1 and records[0].report == SECRET and records[0].image_size == (30, 20)
    # relative paths are still held to the root when absolute ones are allowed
    make_tree(root, [base_row(1, img="../../outside/secret.png")])
    records, log = read(config(root, allow_absolute_paths=True, boxes=None, timeseries_column=""))
    assert records == [] and dict(log.skipped) == {OUTSIDE_ROOT: 1}


def test_resolve_under_root_unit(tmp_path):
    (tmp_path / "a/b").mkdir(parents=True)
    assert resolve_under_root(tmp_path, "a/b/../b/x.png", what="image") == (tmp_path / "a/b/x.png").resolve()
    assert resolve_under_root(tmp_path / "a", "b/../x", what="image") == (tmp_path / "a/x").resolve()
    for bad in ("../x", "a/../../x", "/etc/passwd"):
        with pytest.raises(RecordError, match=OUTSIDE_ROOT):
            resolve_under_root(tmp_path / "a", bad, what="report")


def test_cbis_csv_path_escape_is_a_counted_skip(tmp_path):
    from test_cbis_source import read as cbis_read
    from test_cbis_source import row as cbis_row
    from test_cbis_source import write_tree as cbis_tree

    root = tmp_path / "cbis"
    bad = cbis_row("P_00001", "Mass-Training_P_00001_LEFT_CC")
    good = cbis_row("P_00002", "Mass-Training_P_00002_LEFT_CC")
    cbis_tree(root, {"mass_train": [bad, good]})
    # rewrite the first image path so that it climbs out of the root (the file exists there)
    Image.fromarray(np.full((8, 8), 1, np.uint8)).save(tmp_path / "escaped.png")
    csv_path = next(p for p in root.rglob("*.csv") if "mass" in p.name and "train" in p.name)
    text = csv_path.read_text().replace("Mass-Training_P_00001_LEFT_CC/1.2.3/1.2.4/000000.dcm",
                                      "Mass-Training_P_00001_LEFT_CC/1.2.3/../../../escaped.png")
    csv_path.write_text(text)
    records, log = cbis_read(root)
    assert dict(log.skipped) == {OUTSIDE_ROOT: 1} and len(records) == 1


def test_mimic_paths_from_ids_stay_under_their_roots(tmp_path):
    from kdscale.data.mimic_tables import ImageRef, ListEntry
    from kdscale.data.sources.mimic import MimicSource

    source = MimicSource.__new__(MimicSource)     # only the path methods, no tables
    source.cxr_root, source.ehr_root = tmp_path / "cxr", tmp_path / "ehr"
    source.cfg = type("C", (), {"resized_image_dir": "", "reports_root": str(tmp_path / "rep"),
                                "task": "in-hospital-mortality"})()
    ok = ImageRef.__new__(ImageRef)
    ok.dicom_id, ok.subject_id, ok.study_id = "d1", "10000032", "50414267"
    assert source._image_path(ok) == tmp_path / "cxr/files/p10/p10000032/s50414267/d1.jpg"
    evil = ImageRef.__new__(ImageRef)
    evil.dicom_id, evil.subject_id, evil.study_id = "../../../../../../etc/passwd", "10000032", "5"
    with pytest.raises(RecordError, match=OUTSIDE_ROOT):
        source._image_path(evil)
    entry = ListEntry.__new__(ListEntry)
    entry.split, entry.stay = "train", "../../../outside.csv"
    with pytest.raises(RecordError, match=OUTSIDE_ROOT):
        source._series_path(entry)


# -- 13.4: ambiguous CSVs ---------------------------------------------------------------------

def test_duplicate_column_names_are_an_error_naming_them(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("patient,died,age,died\np1,0,40,1\np2,1,41,0\n")
    with pytest.raises(DataError, match=r"duplicate column name\(s\) \['died'\].*m\.csv"):
        list(open_csv(path, ["patient"], what="manifest"))
    path.write_text("patient,died, died\np1,0,1\n")              # equal once spaces are stripped
    with pytest.raises(DataError, match="duplicate column"):
        list(open_csv(path))
    path.write_text("patient,died,,\np1,0,,\n")                    # unnamed trailing columns: fine
    assert [r["died"] for _, r in open_csv(path)] == ["0"]


def test_duplicate_columns_in_manifest_boxes_and_series(tmp_path):
    make_tree(tmp_path, [base_row(1), base_row(2)])
    text = (tmp_path / "manifest.csv").read_text().splitlines()
    (tmp_path / "manifest.csv").write_text("\n".join([text[0] + ",died"] + [t + ",1" for t in text[1:]]) + "\n")
    with pytest.raises(DataError, match=r"\['died'\].*manifest\.csv"):
        read(config(tmp_path, boxes=None))
    make_tree(tmp_path, [base_row(1)])
    (tmp_path / "regions.csv").write_text("file,what,x,y,w,h,mask,x\n")
    with pytest.raises(DataError, match=r"\['x'\].*regions\.csv"):
        read(config(tmp_path))
    (tmp_path / "ts").mkdir()
    (tmp_path / "ts/p1.csv").write_text("Hours,Heart Rate,Heart Rate\n0.5,80,81\n")
    make_tree(tmp_path, [base_row(1, ts="ts/p1.csv")])
    records, log = read(config(tmp_path, boxes=None, on_bad_modality="skip_sample"))
    assert records == [] and dict(log.skipped) == {"unreadable time series": 1}


def test_manifest_without_rows_is_an_error(tmp_path):
    make_tree(tmp_path, [])
    with pytest.raises(DataError, match="no data rows.*manifest.csv"):
        read(config(tmp_path, boxes=None))


def test_boxes_spec_needs_its_file(tmp_path):
    with pytest.raises(ValueError, match="coco_json"):
        BoxesSpec(format="coco")
    with pytest.raises(ValueError, match="boxes.csv"):
        BoxesSpec(format="circle")
    with pytest.raises(DataError, match="COCO boxes file not found"):
        make_tree(tmp_path, [base_row(1)])
        read(config(tmp_path, boxes=BoxesSpec(format="coco", coco_json=str(tmp_path / "none.json"))))
    assert IngestLog("x").summary()["dropped_modalities"] == {}
