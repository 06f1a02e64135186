"""Issue 16 (data side): typed demographics with roles, the label policy for unrecognised values
and the one prevalence definition, loud failure of builds that keep nothing, time-series channel
selection and valid ranges, per-modality quarantine, and COCO / circle boxes. Each case writes its
own manifest fixture in tmp_path; expected values are hand-computed."""
from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdscale.config import ConfigError
from kdscale.data.ehr import Discretizer, load_discretizer_config, read_timeseries_csv, select_channels
from kdscale.data.ingest import IngestLog, kept_failure
from kdscale.data.labels import format_label_table, label_counts, prevalence, prevalence_array
from kdscale.data.sources.manifest import BoxesSpec, Demographics, LabelSpec, ManifestSource
from kdscale.data.summary import format_table, summarize, write_summary

from test_manifest_source import base_row, config, make_tree, read

REPO = Path(__file__).resolve().parent.parent


def _cfg(root: Path, **overrides):
    return config(root, **{"boxes": None, "timeseries_column": "", **overrides})


# -- 1. demographics -------------------------------------------------------------------------

def test_demographic_roles_are_typed_under_canonical_keys(tmp_path):
    rows = [base_row(1, sex="female", age="54", site="asian"), base_row(2, sex="M", age="?", site="white"),
            base_row(3, sex="x", age="300", site="martian"), base_row(4, sex="", age="", site="")]
    make_tree(tmp_path, rows)
    demo = Demographics(sex_column="sex", sex_values={"F": "F", "female": "F", "M": "M"}, age_column="age",
                        ethnicity_column="site", ethnicity_values={"asian": "Asian", "white": "White"})
    records, log = read(_cfg(tmp_path, demographics=demo, meta_columns=[]))
    metas = [(r.meta["sex"], r.meta["age"], r.meta["ethnicity"]) for r in records]
    assert metas == [("F", 54.0, "Asian"), ("M", None, "White"), (None, None, None), (None, None, None)]
    assert isinstance(records[0].meta["age"], float)
    # bad values are counted, never fatal; blanks are simply unknown
    assert log.n_skipped == 0
    assert log.notes["meta: sex value not understood (column 'sex'; set to unknown)"] == 1
    assert log.notes["meta: age value not understood (column 'age'; set to unknown)"] == 2
    assert log.notes["meta: ethnicity value not understood (column 'site'; set to unknown)"] == 1


def test_a_gender_column_takes_the_sex_role_with_default_spellings(tmp_path):
    make_tree(tmp_path, [base_row(1, sex="Female"), base_row(2, sex=" m ")])
    records, _ = read(_cfg(tmp_path, demographics=Demographics(sex_column="sex"), meta_columns=["site"]))
    assert [r.meta["sex"] for r in records] == ["F", "M"] and records[0].meta["site"] == "A"
    with pytest.raises(ValueError, match="age_range"):
        Demographics(age_range=[10, 5])


# -- 2. labels and prevalence ----------------------------------------------------------------

def test_prevalence_is_one_definition_excluding_unknown():
    assert prevalence(2, 1) == pytest.approx(2 / 3)
    assert math.isnan(prevalence(0, 0))
    y = np.array([[1, 0], [0, np.nan], [1, np.nan], [np.nan, np.nan]], dtype=np.float32)
    pos, neg, unk = label_counts(y)
    assert pos.tolist() == [2, 0] and neg.tolist() == [1, 1] and unk.tolist() == [1, 3]
    assert prevalence_array(pos, pos + neg).tolist() == pytest.approx([2 / 3, 0.0])
    # the report computes the same number (kdscale.eval.analysis uses kdscale.data.labels)
    from kdscale.eval import analysis
    assert analysis.prevalence is prevalence and analysis.prevalence_array is prevalence_array


def test_unrecognised_label_values_are_unknown_not_negative(tmp_path):
    rows = [base_row(1, diagnosis="COVID-19"), base_row(2, diagnosis="todo"), base_row(3, diagnosis="Unknown"),
            base_row(4, diagnosis="SARS"), base_row(5, diagnosis="COVID-19, ARDS")]
    make_tree(tmp_path, rows)
    label = LabelSpec(name="covid", column="diagnosis", positive=["COVID-19"], contains=True, negative=["SARS"])
    records, log = read(_cfg(tmp_path, labels=[label]))
    y = [r.labels[0] for r in records]
    assert y[0] == 1 and y[3] == 0 and y[4] == 1 and np.isnan(y[1]) and np.isnan(y[2])
    assert log.label_values.to_json()["train"]["covid"]["unknown"] == {"todo": 1, "Unknown": 1}
    # other: negative / skip restore the explicit alternatives
    records, _ = read(_cfg(tmp_path, labels=[LabelSpec(name="covid", column="diagnosis", positive=["COVID-19"],
                                                       contains=True, other="negative")]))
    assert [r.labels[0] for r in records] == [1, 0, 0, 0, 1]
    records, log = read(_cfg(tmp_path, labels=[LabelSpec(name="covid", column="diagnosis", positive=["COVID-19"],
                                                         contains=True, negative=["SARS"], other="skip")]))
    assert len(records) == 3 and dict(log.skipped) == {"label value outside expected set": 2}


def test_positive_yes_on_a_01_column_warns_and_is_not_prevalence_zero(tmp_path, caplog):
    make_tree(tmp_path, [base_row(1, died="1"), base_row(2, died="0"), base_row(3, died="0")])
    cfg = _cfg(tmp_path, labels=[LabelSpec(name="died", column="died", positive=["yes"])])
    with caplog.at_level(logging.WARNING):
        records, log = read(cfg)
    assert all(np.isnan(r.labels[0]) for r in records)          # unknown, not 3 negatives
    assert "listed value(s) ['yes'] never occur in column 'died'" in caplog.text
    assert log.notes["label died: listed value(s) never occur: ['yes']"] == 1
    summary = summarize(records, ["died"])
    split = summary.to_json()["splits"]["train"]
    assert split["label_prevalence"] == {"died": None}             # nothing known: not 0.0
    assert split["label_counts"]["died"] == {"positive": 0, "negative": 0, "unknown": 3}


def test_label_table_per_split_with_raw_values_and_prevalence(tmp_path):
    rows = [base_row(1, diagnosis="pneumonia"), base_row(2, diagnosis="normal"), base_row(3, diagnosis="normal"),
            base_row(4, diagnosis="todo"), base_row(5, diagnosis="", split="test")]
    make_tree(tmp_path, rows)
    cfg = _cfg(tmp_path, labels=[LabelSpec(name="pneumonia", column="diagnosis", positive=["pneumonia"],
                                           negative=["normal"])])
    log = IngestLog("manifest")
    source = ManifestSource(cfg)
    summary = summarize(source.records(log), source.label_names)
    payload = write_summary(tmp_path / "s.json", summary, log, source.describe())
    train = payload["data"]["splits"]["train"]
    assert train["label_counts"]["pneumonia"] == {"positive": 1, "negative": 2, "unknown": 1}
    assert train["label_prevalence"]["pneumonia"] == round(1 / 3, 4)      # 1 / (1 + 2), todo excluded
    text = format_table(payload)
    assert "train  pneumonia               1      2        1      0.333" in text
    assert "positive <- pneumonia (1)" in text and "negative <- normal (2)" in text
    assert "unknown <- todo (1)" in text and "unknown <- <blank> (1)" in text
    assert "SECRET" not in text
    # a duplicate-key skip is not tallied: the raw values add up to the counts
    make_tree(tmp_path, rows + [base_row(1, diagnosis="pneumonia")])
    records, log = read(cfg)
    assert log.label_values.to_json()["train"]["pneumonia"]["positive"] == {"pneumonia": 1}
    # summaries keep the 20 most frequent values per outcome (a free-text column cannot copy itself)
    from kdscale.data.labels import LabelTally
    tally = LabelTally()
    for i in range(25):
        tally.add("train", "a", "unknown", f"v{i}")
    kept = tally.to_json()["train"]["a"]["unknown"]
    assert len(kept) == 21 and kept["<other values>"] == 5
    # long values are cut in the table
    assert "x" * 30 not in format_label_table({"train": {"a": {"positive": 1, "negative": 0, "unknown": 0}}},
                                              {"train": {"a": {"positive": {"x" * 30: 1}}}})


# -- 3. loud failure -------------------------------------------------------------------------

def test_kept_failure_message_and_threshold():
    ingest = {"source": "manifest", "read": 10, "kept": 0, "skipped_by_reason": {"image file missing": 7,
                                                                                 "corrupt image": 3}}
    msg = kept_failure(ingest)
    assert "kept 0 of 10" in msg and msg.index("image file missing") < msg.index("corrupt image")
    assert kept_failure({**ingest, "kept": 4}) is None
    assert "min_kept_fraction" in kept_failure({**ingest, "kept": 4}, 0.5)
    assert kept_failure({**ingest, "kept": 5}, 0.5) is None


def _write_cfg(tmp_path: Path, root: Path, extra: str = "") -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""defaults: [{REPO / 'configs/base.yaml'}]
run: {{out_dir: {tmp_path / 'run'}}}
data:
  source: manifest
  {extra}
  manifest:
    csv: {root / 'manifest.csv'}
    patient_column: patient
    key_columns: [study]
    split_column: split
    image_column: img
    image_dir: images
    require_image: true
    labels: [{{name: died, column: died}}]
""")
    return cfg


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "kdscale.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_fully_quarantined_build_fails_loudly(tmp_path):
    root = tmp_path / "data"
    make_tree(root, [base_row(1), base_row(2)])
    for image in (root / "images").iterdir():
        image.unlink()
    cfg = _write_cfg(tmp_path, root)
    result = _cli("inspect", "--cfg", str(cfg))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stderr and "kept 0 of 2" in result.stderr and "image file missing" in result.stderr
    summary = json.loads((tmp_path / "run/inspect/data_summary.json").read_text())
    assert summary["failed"] and summary["ingest"]["kept"] == 0
    result = _cli("shards", "--cfg", str(cfg), "--no-progress")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stderr and "image file missing" in result.stderr
    build = json.loads((tmp_path / "run/shards/build_summary.json").read_text())
    assert build["complete"] is False and "kept 0 of 2" in build["failed"]


def test_min_kept_fraction_threshold_on_inspect(tmp_path):
    from kdscale.data.summary import inspect_source
    from kdscale.schema import load_config

    root = tmp_path / "data"
    make_tree(root, [base_row(1), base_row(2), base_row(3)])
    (root / "images/im1.png").unlink()
    cfg_path = _write_cfg(tmp_path, root, "min_kept_fraction: 0.9")
    payload = inspect_source(load_config(cfg_path), tmp_path / "out")
    assert "kept 2 of 3" in payload["failed"]
    payload = inspect_source(load_config(cfg_path, ["data.min_kept_fraction=0.5"]), tmp_path / "out")
    assert payload["failed"] is None
    with pytest.raises(Exception, match="min_kept_fraction"):
        load_config(cfg_path, ["data.min_kept_fraction=1.5"])


# -- 4. time series --------------------------------------------------------------------------

DISC = """name: tiny-ranges
out_of_range: missing
channels:
  - {name: Heart Rate, type: continuous, normal_value: "80", valid_min: 0, valid_max: 300}
  - {name: Temp, type: continuous, normal_value: "37", valid_min: 25, valid_max: 45, out_of_range: clip}
  - {name: Alert, type: categorical, normal_value: "yes", values: ["yes", "no"]}
"""


def test_channel_selection_extra_columns_and_missing_channels(tmp_path, caplog):
    (tmp_path / "ts").mkdir()
    (tmp_path / "ts/p1.csv").write_text("Hours,Heart Rate,Pulse,Notes\n0.5,90,70,a\n")   # no Alert, 2 extra
    (tmp_path / "ts/p2.csv").write_text("Hours,Heart Rate,Pulse\n0.5,95,71\n")
    make_tree(tmp_path, [base_row(1, ts="ts/p1.csv"), base_row(2, ts="ts/p2.csv")])
    with caplog.at_level(logging.WARNING):
        records, log = read(config(tmp_path, boxes=None))
    assert [r.ehr.shape for r in records] == [(1, 5), (1, 5)] and log.n_skipped == 0
    # Heart Rate observed; Alert never observed: normal value one-hot, mask 0
    assert records[0].ehr[0].tolist() == [90.0, 1.0, 0.0, 1.0, 0.0]
    listed = [m for m in caplog.messages if "not channels in use" in m]
    assert len(listed) == 1 and "['Notes', 'Pulse']" in listed[0]              # listed once
    # a subset of the config's channels
    records, _ = read(config(tmp_path, boxes=None, timeseries_channels=["Heart Rate"]))
    assert records[0].ehr[0].tolist() == [90.0, 1.0]
    with pytest.raises(ConfigError, match="'Pulse'.*not in the discretizer config"):
        read(config(tmp_path, boxes=None, timeseries_channels=["Pulse"]))


def test_valid_ranges_set_missing_or_clip_and_are_counted_per_channel(tmp_path):
    (tmp_path / "r.yaml").write_text(DISC)
    disc = Discretizer(load_discretizer_config(tmp_path / "r.yaml"))
    events = [(0.5, {"Heart Rate": "735", "Temp": "-17.8"}), (1.5, {"Heart Rate": "88", "Temp": "50"}),
              (2.5, {"Heart Rate": "-1", "Temp": "36.5"})]
    x, counts = disc.transform(events, 2.5)
    # HR 735 -> missing: normal 80 carried; 88; -1 -> missing: 88 carried. Temp -17.8 -> clip 25, 50 -> 45.
    assert x[:, 0].tolist() == [80.0, 88.0, 88.0] and x[:, 1].tolist() == [25.0, 45.0, 36.5]
    assert x[:, 4].tolist() == [0.0, 1.0, 0.0] and x[:, 5].tolist() == [1.0, 1.0, 1.0]   # masks
    assert counts["out_of_range"] == 4 and counts["out_of_range_by_channel"] == {"Heart Rate": 2, "Temp": 2}
    # through the manifest: counted per channel in the ingest notes
    (tmp_path / "ts").mkdir()
    (tmp_path / "ts/p1.csv").write_text("Hours,Heart Rate,Temp\n0.5,735,-17.8\n1.5,88,37\n")
    make_tree(tmp_path, [base_row(1, ts="ts/p1.csv")])
    records, log = read(config(tmp_path, boxes=None, discretizer=str(tmp_path / "r.yaml")))
    assert log.notes["ehr: Heart Rate outside its valid range (set to missing)"] == 1
    assert log.notes["ehr: Temp outside its valid range (clipped)"] == 1


@pytest.mark.parametrize("yaml_text,match", [
    ('channels: [{name: A, type: continuous, normal_value: "1", valid_min: 5}]', "outside"),
    ('channels: [{name: A, type: continuous, normal_value: "1", valid_min: 2, valid_max: 1}]', "below"),
    ('channels: [{name: A, type: continuous, normal_value: "1", out_of_range: drop}]', "out_of_range"),
    ('channels: [{name: A, type: categorical, normal_value: "a", values: ["a"], valid_min: 0}]', "continuous"),
    ('chanels: []', "channels"),
    ('out_of_range: clip\nextra: 1\nchannels: [{name: A, type: continuous, normal_value: "1"}]', "extra"),
])
def test_range_config_errors_name_the_key(tmp_path, yaml_text, match):
    (tmp_path / "d.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_discretizer_config(tmp_path / "d.yaml")


def test_mimic_discretizer_has_no_ranges_and_example_configs_load(repo_root, monkeypatch):
    mimic = load_discretizer_config(repo_root / "configs/ehr/mimic4_17ch.yaml")
    assert all(c.valid_min is None and c.valid_max is None for c in mimic.channels)   # MedFuse features unchanged
    icu = load_discretizer_config(repo_root / "configs/ehr/physionet2012_icu.yaml")
    by_name = {c.name: c for c in icu.channels}
    assert (by_name["pH"].valid_min, by_name["pH"].valid_max) == (6.5, 8.0) and by_name["SaO2"].out_of_range == "clip"
    assert select_channels(icu, ["MechVent", "HR"]).channel_names == ["HR", "MechVent"]
    from kdscale.schema import load_config
    monkeypatch.chdir(repo_root)
    cfg = load_config("configs/data/icu_timeseries_example.yaml",
                      [f"data.manifest.csv={repo_root / 'configs/base.yaml'}", f"data.manifest.root={repo_root}"])
    assert cfg.data.manifest.demographics.sex_values == {"0": "F", "1": "M"}
    assert cfg.data.min_kept_fraction == 0.5


def test_read_timeseries_extra_columns_still_an_error_for_mimic(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("Hours,A,B\n1,2,3\n")
    from kdscale.data.ingest import DataError
    with pytest.raises(DataError, match="not a channel"):
        read_timeseries_csv(path, ["A"])
    seen: set = set()
    assert read_timeseries_csv(path, ["A"], ignore_extra=True, extra_seen=seen) == [(1.0, {"A": "2"})]
    assert seen == {"B"}


# -- 5. per-modality quarantine --------------------------------------------------------------

def test_bad_cell_drops_only_that_modality(tmp_path):
    (tmp_path / "ts").mkdir()
    (tmp_path / "ts/bad.csv").write_text("Hours,Heart Rate\n5,80\n1,81\n")          # hours decrease
    make_tree(tmp_path, [base_row(1, hr="?"), base_row(2, ts="ts/bad.csv"), base_row(3)])
    records, log = read(config(tmp_path, boxes=None))
    r1, r2, r3 = records
    assert r1.tabular is None and r1.image is not None and r1.report is not None
    assert r2.ehr is None and r2.tabular is not None and r2.image is not None
    assert r3.tabular is not None and log.n_skipped == 0 and log.kept == 3
    assert dict(log.dropped_modalities) == {"tabular: non-numeric value": 1, "ehr: unreadable time series": 1}
    assert log.summary()["dropped_modalities"] == dict(log.dropped_modalities)
    records, log = read(config(tmp_path, boxes=None, on_bad_modality="skip_sample"))
    assert [r.key for r in records] == ["s3"] and dict(log.skipped) == {"non-numeric value": 1,
                                                                        "unreadable time series": 1}
    from kdscale.data.ingest import DataError
    with pytest.raises(DataError, match="bad tabular"):
        read(config(tmp_path, boxes=None), on_bad_sample="error")


def test_corrupt_optional_image_drops_the_image_only(tmp_path):
    make_tree(tmp_path, [base_row(1), base_row(2)])
    (tmp_path / "images/im1.png").write_bytes(b"not an image")
    records, log = read(_cfg(tmp_path, require_image=False))
    assert records[0].image is None and records[0].tabular is not None and len(records) == 2
    assert dict(log.dropped_modalities) == {"image: corrupt image": 1}
    records, log = read(_cfg(tmp_path))                                          # require_image: skip
    assert len(records) == 1 and dict(log.skipped) == {"corrupt image": 1}


# -- 8. COCO and circle boxes ----------------------------------------------------------------

def _boxes_of(records):
    return {r.key: [(b.label, b.x, b.y, b.w, b.h) for b in r.boxes] for r in records}


def test_coco_json_boxes(tmp_path):
    make_tree(tmp_path, [base_row(1), base_row(2)])                 # images 30 x 20
    coco = {"images": [{"id": 7, "file_name": "im1.png", "width": 30, "height": 20},
                       {"id": 8, "file_name": "im2.png", "width": 30, "height": 20}],
            "categories": [{"id": 1, "name": "lung"}, {"id": 2, "name": "opacity"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [2, 3, 10, 4], "iscrowd": 0},
                            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 15.5, 20]},
                            {"id": 3, "image_id": 8, "category_id": 1, "bbox": [15, 0, 15, 20]}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    spec = BoxesSpec(format="coco", coco_json=str(tmp_path / "coco.json"))
    labels = [LabelSpec(name="opacity", source="boxes", positive=["opacity"])]
    records, log = read(config(tmp_path, timeseries_column="", boxes=spec, labels=labels))
    assert _boxes_of(records) == {"s1": [("opacity", 2.0, 3.0, 10.0, 4.0), ("lung", 0.0, 0.0, 15.5, 20.0)],
                                  "s2": [("lung", 15.0, 0.0, 15.0, 20.0)]}
    assert [r.labels.tolist() for r in records] == [[1.0], [0.0]]
    # a COCO image size that does not match the file is a counted skip, not a misplaced box
    coco["images"][1]["height"] = 40
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    records, log = read(config(tmp_path, timeseries_column="", boxes=spec, labels=labels))
    assert [r.key for r in records] == ["s1"] and dict(log.skipped) == {"bad box": 1}
    coco["annotations"][0]["category_id"] = 9
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    from kdscale.data.ingest import DataError
    with pytest.raises(DataError, match=r"annotations\[0\]: category_id.*coco.json"):
        read(config(tmp_path, timeseries_column="", boxes=spec, labels=labels))


def _circle_tree(tmp_path, rows):
    make_tree(tmp_path, [base_row(1)])
    with open(tmp_path / "circles.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "lesion", "cx", "cy", "radius"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("origin,expected", [
    ("top", [("mass", 7.0, 2.0, 6.0, 6.0)]),       # centre (10, 5), r 3
    ("bottom", [("mass", 7.0, 12.0, 6.0, 6.0)]),   # y from the bottom: top-based centre 20 - 5 = 15
])
def test_circle_boxes_with_y_origin(tmp_path, origin, expected):
    _circle_tree(tmp_path, [{"file": "im1.png", "lesion": "mass", "cx": 10, "cy": 5, "radius": 3}])
    spec = BoxesSpec(format="circle", csv=str(tmp_path / "circles.csv"), join_column="file", label_column="lesion",
                     x_column="cx", y_column="cy", r_column="radius", y_origin=origin)
    records, log = read(config(tmp_path, timeseries_column="", boxes=spec, labels=[]))
    assert _boxes_of(records) == {"s1": expected} and log.n_skipped == 0


def test_circle_at_the_edge_is_clipped_and_counted(tmp_path):
    _circle_tree(tmp_path, [{"file": "im1.png", "lesion": "calc", "cx": 1, "cy": 18, "radius": 3},
                            {"file": "im1.png", "lesion": "calc", "cx": 29, "cy": 1, "radius": 0}])
    spec = BoxesSpec(format="circle", csv=str(tmp_path / "circles.csv"), join_column="file", label_column="lesion",
                     x_column="cx", y_column="cy", r_column="radius")
    records, log = read(config(tmp_path, timeseries_column="", boxes=spec, labels=[]))
    assert records == [] and dict(log.skipped) == {"bad box": 1}            # radius 0
    _circle_tree(tmp_path, [{"file": "im1.png", "lesion": "calc", "cx": 1, "cy": 18, "radius": 3}])
    records, log = read(config(tmp_path, timeseries_column="", boxes=spec, labels=[]))
    # square [-2, 4] x [15, 21] clipped to the 30 x 20 image: [0, 4] x [15, 20]
    assert _boxes_of(records) == {"s1": [("calc", 0.0, 15.0, 4.0, 5.0)]}
    assert log.notes["circle box clipped to the image"] == 1


def test_xywh_with_bottom_origin(tmp_path):
    make_tree(tmp_path, [base_row(1)], [{"file": "im1.png", "what": "opacity", "x": 2, "y": 3, "w": 10, "h": 4,
                                          "mask": ""}])
    spec = BoxesSpec(csv=str(tmp_path / "regions.csv"), join_column="file", label_column="what", y_origin="bottom")
    records, _ = read(config(tmp_path, timeseries_column="", boxes=spec, labels=[]))
    assert _boxes_of(records) == {"s1": [("opacity", 2.0, 13.0, 10.0, 4.0)]}       # 20 - 3 - 4
