"""CBIS-DDSM source on hand-built tiny trees: header variants, image-level aggregation, boxes from
ROI masks, patient-level splits, tabular leakage control, and every kind of bad input."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.sources.base import LeakageError
from kdscale.data.sources.cbis import CbisConfig, CbisSource
from kdscale.schema import load_config

MASS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
        "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
        "image file path", "cropped image file path", "ROI mask file path"]
CALC = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
        "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
        "image file path", "cropped image file path", "ROI mask file path"]
W, H = 40, 30


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def rect_mask(x0, y0, x1, y1, size=(W, H)) -> np.ndarray:
    m = np.zeros((size[1], size[0]), np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


def row(patient, folder, abn=1, pathology="MALIGNANT", kind="mass", density="2", mask=None, **extra):
    """One CSV row; writes the image (if new) and the ROI mask as PNG next to the .dcm paths."""
    base = {"patient_id": patient, "left or right breast": "LEFT", "image view": "CC", "abnormality id": abn,
            "assessment": "4", "pathology": pathology, "subtlety": "3",
            "image file path": f"{folder}/1.2.3/1.2.4/000000.dcm",
            "cropped image file path": f"{folder}_{abn}/1.2.5/1.2.6/000000.dcm",
            "ROI mask file path": f"{folder}_{abn}/1.2.5/1.2.6/000001.dcm",
            "_mask": rect_mask(10, 5, 20, 10) if mask is None else mask}
    if kind == "mass":
        base.update({"breast_density": density, "abnormality type": "mass", "mass shape": "IRREGULAR",
                     "mass margins": "SPICULATED"})
    else:
        base.update({"breast density": density, "abnormality type": "calcification", "calc type": "PLEOMORPHIC",
                     "calc distribution": "CLUSTERED"})
    base.update(extra)
    return base


def write_tree(root: Path, tables: dict[str, list[dict]], headers: dict[str, list[str]] | None = None,
               files: bool = True) -> Path:
    """tables: csv kind (mass_train ...) -> rows; missing kinds get an empty CSV. ``files``: also
    write each row's image and ROI mask (PNG beside the .dcm path, as if converted in place)."""
    for kind in ("mass_train", "mass_test", "calc_train", "calc_test"):
        header = (headers or {}).get(kind) or (MASS if kind.startswith("mass") else CALC)
        rows = tables.get(kind, [])
        for r in rows if files else []:
            img = root / Path(r["image file path"]).with_suffix(".png")
            if not img.exists():
                save_png(img, np.full((H, W), 80))
            if r.get("_mask") is not None:
                save_png(root / Path(r["ROI mask file path"]).with_suffix(".png"), r["_mask"])
        name = kind.replace("_train", "_case_description_train_set").replace("_test", "_case_description_test_set")
        with open(root / f"{name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return root


def read(root: Path, **cfg):
    log = IngestLog("cbis")
    records = list(CbisSource(CbisConfig(root=str(root), **cfg)).records(log))
    assert log.read == log.kept + log.n_skipped
    return records, log


def test_header_variants_and_extra_columns(tmp_path):
    calc_header = ["patient_age"] + CALC[::-1]  # extra column and reordered: parse by name
    write_tree(tmp_path, {"mass_train": [row("P_1", "Mass-Training_P_1_LEFT_CC", density="3")],
                          "calc_test": [row("P_2", "Calc-Test_P_2_LEFT_CC", kind="calc", density="4",
                                            patient_age="61")]},
               headers={"calc_test": calc_header})
    records, log = read(tmp_path)
    by_key = {r.key: r for r in records}
    assert by_key["Mass-Training_P_1_LEFT_CC"].tabular["breast_density"] == 3
    calc = by_key["Calc-Test_P_2_LEFT_CC"]
    assert calc.tabular["breast_density"] == 4 and calc.tabular["calc_type"] == "PLEOMORPHIC"
    assert calc.boxes[0].label == "calcification" and calc.split == "test"


def test_image_level_aggregation_and_box_from_mask(tmp_path):
    lshape = np.zeros((H, W), np.uint8)
    lshape[20:26, 3:5] = 255   # an L: column x 3-4, rows 20-25 ...
    lshape[24:26, 3:9] = 200   # ... and foot x 3-8, rows 24-25
    folder = "Mass-Training_P_1_LEFT_CC"
    write_tree(tmp_path, {"mass_train": [
        row("P_1", folder, abn=1, pathology="BENIGN"),
        row("P_1", folder, abn=2, pathology="MALIGNANT", mask=lshape, **{"mass shape": "OVAL"})]})
    records, log = read(tmp_path, val_fraction=0.0)
    assert log.read == 1 and log.kept == 1
    rec = records[0]
    assert rec.labels.tolist() == [1.0] and rec.image_size == (W, H)
    assert rec.meta["abnormality_ids"] == ["1", "2"] and rec.meta["pathologies"] == ["BENIGN", "MALIGNANT"]
    b1, b2 = rec.boxes
    assert (b1.x, b1.y, b1.w, b1.h) == (10.0, 5.0, 10.0, 5.0)
    assert (b2.x, b2.y, b2.w, b2.h) == (3.0, 20.0, 6.0, 6.0)
    crop = np.asarray(Image.open(io.BytesIO(b2.mask_png)))
    assert crop.shape == (6, 6) and crop[0, 0] == 255 and crop[0, 5] == 0 and crop[5, 5] == 255
    assert np.asarray(Image.open(io.BytesIO(b1.mask_png))).min() == 255
    assert rec.tabular["n_mass"] == 2 and rec.tabular["mass_shape"] == "IRREGULAR|OVAL"


def test_16bit_mask_from_converted_dicom(tmp_path):
    write_tree(tmp_path, {"mass_train": [row("P_1", "Mass-Training_P_1_LEFT_CC")]})
    mask = (rect_mask(2, 3, 7, 9) > 0).astype(np.uint16) * 65535
    path = next(tmp_path.rglob("000001.png"))
    Image.fromarray(mask).save(path)
    assert Image.open(path).mode.startswith("I")
    box = read(tmp_path)[0][0].boxes[0]
    assert (box.x, box.y, box.w, box.h) == (2.0, 3.0, 5.0, 6.0)


def test_all_benign_image_is_negative(tmp_path):
    write_tree(tmp_path, {"calc_test": [row("P_1", "Calc-Test_P_1_LEFT_CC", kind="calc", pathology="BENIGN"),
                                        row("P_1", "Calc-Test_P_1_LEFT_CC", abn=2, kind="calc",
                                            pathology="BENIGN_WITHOUT_CALLBACK")]})
    records, _ = read(tmp_path)
    assert records[0].labels.tolist() == [0.0]


def test_splits_are_patient_level_and_deterministic(tmp_path):
    rows = [row(f"P_{p}", f"Mass-Training_P_{p}_LEFT_{v}", **{"image view": v})
            for p in range(12) for v in ("CC", "MLO")]
    write_tree(tmp_path, {"mass_train": rows, "mass_test": [row("P_99", "Mass-Test_P_99_LEFT_CC")]})
    first, _ = read(tmp_path, val_fraction=0.5, split_seed=1)
    again, _ = read(tmp_path, val_fraction=0.5, split_seed=1)
    other, _ = read(tmp_path, val_fraction=0.5, split_seed=2)
    split_of = {}
    for r in first:
        assert split_of.setdefault(r.patient_id, r.split) == r.split  # both views: same split
    assert split_of["P_99"] == "test"
    assert {s for p, s in split_of.items() if p != "P_99"} == {"train", "val"}
    assert [r.split for r in first] == [r.split for r in again]
    assert [r.split for r in first] != [r.split for r in other]


def test_tabular_excludes_assessment_by_default(tmp_path):
    write_tree(tmp_path, {"mass_train": [row("P_1", "Mass-Training_P_1_LEFT_CC")]})
    records, _ = read(tmp_path)
    assert "assessment_max" not in records[0].tabular
    assert "assessment_max" not in CbisSource(CbisConfig(root=str(tmp_path))).describe()["teacher_features"]
    records, _ = read(tmp_path, include_assessment=True)
    assert records[0].tabular["assessment_max"] == 4
    assert "INCLUDED" in CbisSource(CbisConfig(root=str(tmp_path), include_assessment=True)).describe()["leakage"]


def test_density_zero_is_a_counted_note(tmp_path):
    write_tree(tmp_path, {"calc_test": [row("P_1", "Calc-Test_P_1_LEFT_CC", kind="calc", density="0")]})
    records, log = read(tmp_path)
    assert records[0].tabular["breast_density"] is None
    assert log.notes["breast_density out of range or blank (set to None)"] == 1


def test_patient_in_train_and_test_csvs(tmp_path):
    write_tree(tmp_path, {"mass_train": [row("P_1", "Mass-Training_P_1_LEFT_CC")],
                          "calc_test": [row("P_1", "Calc-Test_P_1_LEFT_CC", kind="calc")]})
    records, log = read(tmp_path)
    assert [r.split for r in records] == ["test"] and log.skipped["patient also in a test CSV"] == 1
    with pytest.raises(LeakageError, match="P_1.*'train'.*'test'"):
        read(tmp_path, patient_overlap="error")


def test_abnormality_filter(tmp_path):
    write_tree(tmp_path, {"mass_train": [row("P_1", "Mass-Training_P_1_LEFT_CC")],
                          "calc_test": [row("P_2", "Calc-Test_P_2_LEFT_CC", kind="calc")]})
    records, _ = read(tmp_path, abnormality="calc")
    assert [r.patient_id for r in records] == ["P_2"]


def test_kaggle_dicom_info_mapping(tmp_path):
    r = row("P_1", "Mass-Training_P_1_LEFT_CC")
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    write_tree(csv_dir, {"mass_train": [r]}, files=False)
    save_png(tmp_path / "jpeg/1.2.4/1-1.png", np.full((H, W), 90))
    save_png(tmp_path / "jpeg/1.2.6/2-1.png", rect_mask(1, 2, 4, 6))
    save_png(tmp_path / "jpeg/1.2.6/1-1.png", np.full((H, W), 50))  # the crop in the same series
    with open(csv_dir / "dicom_info.csv", "w", newline="") as fh:
        fh.write("file_path,image_path,PatientID,SeriesDescription,SeriesInstanceUID\n"
                 "x,CBIS-DDSM/jpeg/1.2.4/1-1.png,Mass-Training_P_1_LEFT_CC,full mammogram images,1.2.4\n"
                 "x,CBIS-DDSM/jpeg/1.2.6/1-1.png,Mass-Training_P_1_LEFT_CC_1,cropped images,1.2.6\n"
                 "x,CBIS-DDSM/jpeg/1.2.6/2-1.png,Mass-Training_P_1_LEFT_CC_1,ROI mask images,1.2.6\n")
    files = {k: f"csv/{k.split('_')[0]}_case_description_{k.split('_')[1]}_set.csv"
             for k in ("mass_train", "mass_test", "calc_train", "calc_test")}
    records, log = read(tmp_path, csv_files=files, dicom_info_csv="csv/dicom_info.csv")
    box = records[0].boxes[0]
    assert (box.x, box.y, box.w, box.h) == (1.0, 2.0, 3.0, 4.0)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_missing_csv_file_and_columns_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="mass_case_description_train_set.csv"):
        read(tmp_path)
    write_tree(tmp_path, {}, headers={"mass_train": [c for c in MASS if c != "pathology"]})
    with pytest.raises(DataError, match="'pathology'.*mass_case_description_train_set"):
        read(tmp_path)
    write_tree(tmp_path, {"calc_train": [row("P_1", "Calc-Training_P_1_LEFT_CC", kind="calc")]},
               headers={"calc_train": [c for c in CALC if c != "breast density"]})
    with pytest.raises(DataError, match="breast_density"):
        read(tmp_path)


def _damage(root: Path, folder: str, what: str) -> None:
    image = next((root / folder).rglob("000000.png"))
    mask = next((root / f"{folder}_1").rglob("000001.png"))
    if what == "missing image":
        image.unlink()
    elif what == "truncated image":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
    elif what == "garbage mask":
        mask.write_bytes(b"\x89PNG nope")
    elif what == "missing mask":
        mask.unlink()
    elif what == "dcm only":
        image.with_suffix(".dcm").write_bytes(b"DICM")
        image.unlink()


@pytest.mark.parametrize("what,reason", [
    ("missing image", "image file missing"), ("truncated image", "corrupt image"),
    ("garbage mask", "unreadable ROI mask"), ("missing mask", "ROI mask missing"),
    ("dcm only", "DICOM not read")])
def test_bad_files_are_counted_skips(tmp_path, what, reason):
    write_tree(tmp_path, {"mass_train": [row("P_1", "Mass-Training_P_1_LEFT_CC"),
                                         row("P_2", "Mass-Training_P_2_LEFT_CC")]})
    _damage(tmp_path, "Mass-Training_P_1_LEFT_CC", what)
    records, log = read(tmp_path)
    assert [r.patient_id for r in records] == ["P_2"]
    assert dict(log.skipped) == {reason: 1}


@pytest.mark.parametrize("mask,reason", [
    (np.zeros((H, W)), "empty ROI mask"), (rect_mask(1, 1, 3, 3, size=(W + 2, H)), "ROI mask size differs from image")])
def test_bad_mask_content_is_a_counted_skip(tmp_path, mask, reason):
    write_tree(tmp_path, {"mass_train": [row("P_1", "Mass-Training_P_1_LEFT_CC", mask=mask)]})
    records, log = read(tmp_path)
    assert records == [] and dict(log.skipped) == {reason: 1}


def test_pathology_outside_expected_set_and_duplicate_key(tmp_path):
    write_tree(tmp_path, {"mass_train": [
        row("P_1", "Mass-Training_P_1_LEFT_CC", pathology="MAYBE"),
        row("P_2", "Mass-Training_P_2_LEFT_CC"),
        # same first folder, another image path: same key -> the second is a duplicate
        row("P_2", "Mass-Training_P_2_LEFT_CC", **{"image file path": "Mass-Training_P_2_LEFT_CC/9/9/000000.dcm"})]})
    records, log = read(tmp_path)
    assert len(records) == 1
    assert dict(log.skipped) == {"label value outside expected set": 1, "duplicate key": 1}


def test_on_bad_sample_error_stops(tmp_path):
    write_tree(tmp_path, {"mass_train": [row("P_1", "Mass-Training_P_1_LEFT_CC", pathology="")]})
    with pytest.raises(DataError, match="label value outside expected set"):
        list(CbisSource(CbisConfig(root=str(tmp_path))).records(IngestLog("cbis", on_bad_sample="error")))


def test_cbis_yaml_loads(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    cfg = load_config("configs/data/cbis.yaml", [f"data.cbis.root={tmp_path}"])
    assert cfg.data.source == "cbis" and cfg.data.cbis.include_assessment is False
