"""MimicSource on a hand-built tiny tree: pairing rules, cohorts, splits, and bad input."""
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.mimic_tables import R_CLASSES
from kdscale.data.sources.base import LeakageError
from kdscale.data.sources.mimic import MimicConfig, MimicSource

REPO = Path(__file__).resolve().parent.parent
CHANNELS = ["Heart Rate", "Glascow coma scale total"]   # the series may use any subset of the 17
# subject -> (split, stay_id, intime, outtime); subject 13 has films but no ICU stay
STAYS = {"11": ("train", "301", "2150-01-01 00:00:00", "2150-01-05 00:00:00"),
         "12": ("val", "302", "2150-02-01 00:00:00", "2150-02-04 00:00:00"),
         "14": ("test", "304", "2150-03-01 00:00:00", "2150-03-04 00:00:00")}
# dicom -> (subject, study, view, StudyDate, StudyTime)
FILMS = {"a1": ("11", "501", "AP", "21500101", "100000.250"),    # +10 h
         "a2": ("11", "502", "AP", "21500102", "060000.900"),    # +30 h: ties with a3 (fraction dropped)
         "a3": ("11", "502", "AP", "21500102", "060000.100"),    # +30 h: same time, larger dicom -> IHM pick
         "a4": ("11", "503", "AP", "21500103", "120000"),        # +60 h: outside 48 h, phenotyping pick
         "a5": ("11", "504", "PA", "21500103", "130000"),        # in stay but PA: view filter
         "a6": ("11", "505", "AP", "21491231", "000000"),        # before intime
         "b1": ("12", "506", "LATERAL", "21500201", "120000"),   # in stay, lateral
         "b2": ("12", "507", "AP", "21500210", "120000"),        # after outtime
         "c1": ("13", "508", "AP", "21500101", "100000"),        # subject without a stay
         "d1": ("14", "509", "AP", "21500301", "050000")}        # +5 h


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def jpeg(size=(40, 50)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="JPEG")
    return buf.getvalue()


def build_tree(root: Path, ihm_labels=None, drop_metadata_column=None, extra_listfile_rows=()):
    cxr, ehr, rep = root / "cxr", root / "ehr", root / "reports"
    header = ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"]
    rows = [[d, *v] for d, v in FILMS.items()]
    if drop_metadata_column:
        i = header.index(drop_metadata_column)
        header, rows = header[:i] + header[i + 1:], [r[:i] + r[i + 1:] for r in rows]
    write_csv(cxr / "mimic-cxr-2.0.0-metadata.csv", header, rows)
    studies = sorted({(v[0], v[1]) for v in FILMS.values()})
    write_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *R_CLASSES],
              [[s, st, "1.0", "-1.0"] + [""] * 12 for s, st in studies])
    official = {"11": "train", "12": "validate", "13": "test", "14": "test"}
    write_csv(cxr / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
              [[d, v[1], v[0], official[v[0]]] for d, v in FILMS.items()])
    for d, (subj, study, *_) in FILMS.items():
        path = cxr / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}" / f"{d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg())
        report = rep / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}.txt"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("FINDINGS: No focal consolidation.\n")
    write_csv(ehr / "root" / "all_stays.csv",
              ["subject_id", "hadm_id", "stay_id", "intime", "outtime", "admittime", "gender", "ethnicity",
               "anchor_age", "anchor_year", "age"],
              [[s, f"20{s}", v[1], v[2], v[3], v[2], "F", "WHITE", 60, 2148, 60] for s, v in STAYS.items()])
    ihm_labels = ihm_labels or {}
    for task in ("in-hospital-mortality", "phenotyping"):
        listed = {sp: [] for sp in ("train", "val", "test")}
        for subj, (split, stay_id, *_) in STAYS.items():
            name = f"{subj}_episode1_timeseries.csv"
            folder = "test" if split == "test" else "train"
            write_csv(ehr / task / folder / name, ["Hours", *CHANNELS],
                      [["0.5", "80", "15"], ["3.2", "90", ""], ["30", "", "9"]])
            if task == "in-hospital-mortality":
                listed[split].append([name, 0, stay_id, ihm_labels.get(subj, "0")])
            else:
                listed[split].append([name, "72.000000", stay_id, "1", "0"])
        for split, label_rows in listed.items():
            label_rows += [r for s, r in extra_listfile_rows if s == split and task == "in-hospital-mortality"]
            labels = ["y_true"] if task == "in-hospital-mortality" else ["Shock", "Pneumonia"]
            write_csv(ehr / task / f"{split}_listfile.csv", ["stay", "period_length", "stay_id", *labels], label_rows)
    write_csv(root / "ms_cxr.csv", ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                                    "image_width", "image_height", "split"],
              [["a3", "Consolidation", "opacity", "files/...", 40, 50, 20, 25, 80, 100, "test"]])
    return root


def source(root, **kw) -> MimicSource:
    cfg = dict(cxr_root=str(root / "cxr"), ehr_root=str(root / "ehr"), reports_root=str(root / "reports"),
               ms_cxr_csv=str(root / "ms_cxr.csv"), discretizer=str(REPO / "configs/ehr/mimic4_17ch.yaml"))
    cfg.update(kw)
    return MimicSource(MimicConfig(**cfg))


def read(src):
    log = IngestLog("mimic")
    records = list(src.records(log))
    s = log.summary()
    assert s["reconciles"], s
    return records, log


@pytest.fixture
def tree(tmp_path):
    return build_tree(tmp_path)


def test_ihm_pairing_window_view_latest_and_tie_break(tree):
    records, log = read(source(tree, task="in-hospital-mortality", cohort="paired"))
    picked = {r.meta["stay_id"]: r.meta["dicom_id"] for r in records}
    assert picked == {"301": "a3", "304": "d1"}           # a2/a3 tie at +30 h -> larger dicom_id; a4 > 48 h
    assert log.read == 2 and log.kept == 2
    assert log.notes["pairing: view not in AP"] == 1      # b1 (a5 is PA but also past 48 h)
    assert log.notes["pairing: subject without ICU stay"] == 1          # c1
    assert log.notes["paired cohort: stay without a paired image"] == 1  # stay 302
    r = records[0]
    assert r.ehr.shape == (48, 76) and r.image_size == (40, 50) and r.report.startswith("FINDINGS")
    assert r.meta["age"] == 62 and r.meta["age_rule"] == "anchor_year"   # 60 + (2150 - 2148)
    assert r.meta["pairing_rule"].startswith("v1: intime<=StudyDateTime<=intime+48h")
    # MS-CXR box in original pixels (80x100) rescaled to this 40x50 image
    assert [(b.label, b.x, b.y, b.w, b.h) for b in r.boxes] == [("Consolidation", 20, 25, 10, 12.5)]
    json.dumps(r.metadata_json())


def test_phenotyping_uses_outtime_and_partial_keeps_every_stay(tree):
    paired, _ = read(source(tree, task="phenotyping", cohort="paired"))
    assert {r.meta["stay_id"]: r.meta["dicom_id"] for r in paired} == {"301": "a4", "304": "d1"}
    partial, log = read(source(tree, task="phenotyping", cohort="partial"))
    assert len(partial) == 3 and log.read == 3
    assert {r.meta["stay_id"]: r.image is not None for r in partial} == {"301": True, "302": False, "304": True}
    assert {r.meta["stay_id"]: r.split for r in partial} == {"301": "train", "302": "val", "304": "test"}
    assert partial[0].ehr.shape == (72, 76)
    src = source(tree, task="phenotyping", cohort="partial")
    d = src.describe()
    assert src.label_names == ["Shock", "Pneumonia"] and len(d["ehr_feature_names"]) == 76
    assert d["cohort_counts"]["splits"]["train"] == {"stays": 1, "paired": 1}


def test_radiology_split_follows_ehr_subjects_or_official_file(tree):
    records, log = read(source(tree, task="radiology"))
    assert len(records) == len(FILMS) and log.skipped == {}
    split = {r.meta["dicom_id"]: r.split for r in records}
    assert split["a1"] == "train" and split["b1"] == "val" and split["d1"] == "test"
    assert split["c1"] == "train"                          # no ICU stay -> train under the EHR split
    assert records[0].labels.tolist()[:3] == [1.0, 0.0, 0.0]   # -1 -> 0 (U-Zeros), blank -> 0
    ones, _ = read(source(tree, task="radiology", uncertain_label="ones"))
    assert ones[0].labels.tolist()[:2] == [1.0, 1.0]
    official, _ = read(source(tree, task="radiology", ehr_root=""))
    split = {r.meta["dicom_id"]: r.split for r in official}
    assert split["b1"] == "val" and split["c1"] == "test"  # 'validate' -> 'val'


def test_age_falls_back_to_medfuse_rule(tree):
    path = tree / "ehr" / "root" / "all_stays.csv"
    rows = list(csv.reader(open(path)))
    rows = [r[:9] + r[10:] for r in rows]                  # drop anchor_year
    rows[1][-1] = "-1"                                     # MedFuse: negative age -> 90
    write_csv(path, rows[0], rows[1:])
    records, _ = read(source(tree, task="phenotyping"))
    ages = {r.meta["stay_id"]: (r.meta["age"], r.meta["age_rule"]) for r in records}
    assert ages["301"] == (90.0, "medfuse_anchor_age") and ages["302"] == (60.0, "medfuse_anchor_age")


def test_missing_column_names_file_and_column(tmp_path):
    root = build_tree(tmp_path, drop_metadata_column="ViewPosition")
    with pytest.raises(DataError) as err:
        read(source(root, task="phenotyping"))
    assert "mimic-cxr-2.0.0-metadata.csv" in str(err.value) and "ViewPosition" in str(err.value)


def test_bad_samples_are_skipped_with_reasons(tree):
    a3 = tree / "cxr/files/p11/p11/s502/a3.jpg"
    a3.write_bytes(a3.read_bytes()[:60])                                   # truncated JPEG
    (tree / "ehr/in-hospital-mortality/train/12_episode1_timeseries.csv").write_text(
        "Hours,Heart Rate\n0.5,80\nsoon,81\n")                             # unreadable series
    (tree / "ehr/in-hospital-mortality/test/14_episode1_timeseries.csv").write_text(
        "Hours,Heart Rate\n0.5,nan\n")                                     # NaN value
    records, log = read(source(tree, task="in-hospital-mortality", cohort="partial"))
    # partial cohort: the corrupt film does not drop the ICU stay, it is kept EHR-only
    assert [(r.key, r.image, r.meta["paired"], r.meta["unusable_dicom_id"]) for r in records] == [
        ("11_301", None, False, "a3")]
    assert log.read == 3 and log.kept == 1
    assert log.skipped == {"unreadable time series": 1, "non-finite EHR value": 1}
    assert log.notes["partial cohort: corrupt image, stay kept EHR-only"] == 1
    # paired cohort: a stay whose image is corrupt cannot be paired -> counted skip
    records, log = read(source(tree, task="in-hospital-mortality", cohort="paired"))
    assert records == [] and log.skipped == {"corrupt image": 1, "non-finite EHR value": 1}


def test_empty_report_and_bad_labels(tmp_path):
    root = build_tree(tmp_path, ihm_labels={"14": "2"})
    (root / "reports/files/p11/p11/s502.txt").write_text("   \n")
    chexpert = root / "cxr/mimic-cxr-2.0.0-chexpert.csv"
    text = chexpert.read_text().replace("12,506,1.0", "12,506,3.0")
    chexpert.write_text(text)
    records, log = read(source(root, task="in-hospital-mortality", cohort="paired"))
    # EHR tasks: an empty report keeps the image without its report (counted note)
    assert [(r.key, r.report, r.image is not None) for r in records] == [("11_301", None, True)]
    assert log.skipped == {"bad label": 1} and log.notes["empty report, image kept without report"] == 1
    records, log = read(source(root, task="radiology"))
    assert log.skipped == {"empty report": 2, "bad label": 1}   # a2 and a3 share study 502; b1 is study 506
    assert len(records) == len(FILMS) - 3


def test_duplicate_key_is_skipped(tmp_path):
    root = build_tree(tmp_path, extra_listfile_rows=[("train", ["11_episode1_timeseries.csv", 0, "301", "1"])])
    records, log = read(source(root, task="in-hospital-mortality"))
    assert len(records) == 3 and log.read == 4 and log.skipped == {"duplicate key": 1}


def test_patient_in_two_splits_is_an_error(tmp_path):
    root = build_tree(tmp_path, extra_listfile_rows=[("test", ["11_episode2_timeseries.csv", 0, "399", "1"])])
    with pytest.raises(LeakageError) as err:
        read(source(root, task="in-hospital-mortality"))
    assert "patient 11" in str(err.value) and "'train'" in str(err.value) and "'test'" in str(err.value)


def test_data_config_file_with_overrides(tree):
    from kdscale.config import ConfigError
    from kdscale.schema import load_config

    cfg = load_config(REPO / "configs/data/mimic.yaml",
                      [f"data.mimic.cxr_root={tree / 'cxr'}", f"data.mimic.ehr_root={tree / 'ehr'}",
                       "data.mimic.task=in-hospital-mortality"])
    assert cfg.data.source == "mimic" and cfg.data.mimic.task == "in-hospital-mortality"
    assert len(read(MimicSource(cfg.data.mimic))[0]) == 3
    with pytest.raises(ConfigError, match="cxr_root"):
        load_config(REPO / "configs/data/mimic.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(REPO / "configs/data/mimic.yaml", [f"data.mimic.cxr_root={tree / 'nope'}"])


def test_radiology_ehr_split_must_have_val_and_test(tree):
    # pitfall 1: when no listed val/test subject matches a CXR subject, refuse instead of training on all
    for split, subject in (("val", "98"), ("test", "99")):
        write_csv(tree / "ehr/phenotyping" / f"{split}_listfile.csv", ["stay", "period_length", "stay_id", "Shock"],
                  [[f"{subject}_episode1_timeseries.csv", "10", f"3{subject}", "0"]])
    with pytest.raises(DataError, match="no val or no test"):
        read(source(tree, task="radiology"))


def test_resized_image_dir_layout(tree):
    flat = tree / "resized"
    flat.mkdir()
    (flat / "d1.jpg").write_bytes(jpeg((64, 80)))
    records, log = read(source(tree, task="in-hospital-mortality", cohort="paired", resized_image_dir=str(flat)))
    assert log.skipped == {"missing image": 1}                # a3 is not in the flat folder
    assert [(r.meta["dicom_id"], r.image_size) for r in records] == [("d1", (64, 80))]


def test_listfile_stay_of_another_subject_is_an_error(tmp_path):
    # stay 304 belongs to subject 14 in all_stays.csv; a train row claims it for subject 11
    root = build_tree(tmp_path, extra_listfile_rows=[("train", ["11_episode2_timeseries.csv", 0, "304", "0"])])
    with pytest.raises(DataError) as err:
        read(source(root, task="in-hospital-mortality"))
    msg = str(err.value)
    assert "train_listfile.csv" in msg and "stay_id 304" in msg and "subject 14" in msg and "subject 11" in msg


def test_stay_listed_in_two_listfiles_is_an_error(tmp_path):
    root = build_tree(tmp_path, extra_listfile_rows=[("test", ["99_episode1_timeseries.csv", 0, "301", "0"])])
    with pytest.raises(DataError, match=r"stay_id 301 is listed twice: subject 11 .*train_listfile.csv.*subject 99"):
        read(source(root, task="in-hospital-mortality"))


def test_absurd_period_empty_series_and_short_row_are_counted_skips(tree):
    listfile = tree / "ehr/phenotyping/train_listfile.csv"
    listfile.write_text(listfile.read_text().replace("72.000000", "1e13"))      # stay 301: absurd length
    (tree / "ehr/phenotyping/train/12_episode1_timeseries.csv").write_text("Hours,Heart Rate\n")   # header only
    (tree / "ehr/phenotyping/test/14_episode1_timeseries.csv").write_text(
        "Hours,Heart Rate,Glascow coma scale total\n0.5,80,15\n1.5,81\n")           # short (ragged) row
    records, log = read(source(tree, task="phenotyping", cohort="partial"))
    assert records == [] and log.read == 3
    assert log.skipped == {"implausible series length": 1, "empty time series": 1, "unreadable time series": 1}


def test_radiology_subject_in_val_and_test_listfiles_is_leakage(tree):
    test_listfile = tree / "ehr/phenotyping/test_listfile.csv"
    with open(test_listfile, "a") as fh:
        fh.write("12_episode2_timeseries.csv,10,399,0,0\n")                  # subject 12 is a val subject
    with pytest.raises(LeakageError) as err:
        read(source(tree, task="radiology"))
    msg = str(err.value)
    assert "patient 12" in msg and "val_listfile.csv" in msg and "test_listfile.csv" in msg


def test_val_from_train_false_merges_val_stays_into_train(tree):
    records, log = read(source(tree, task="phenotyping", cohort="partial", val_from_train=False))
    assert {r.meta["stay_id"]: r.split for r in records} == {"301": "train", "302": "train", "304": "test"}
    assert log.notes["val listfile stays merged into train (val_from_train: false)"] == 1
    counts = source(tree, task="phenotyping", val_from_train=False).cohort_counts()["splits"]
    assert counts == {"train": {"stays": 2, "paired": 1}, "test": {"stays": 1, "paired": 1}}


@pytest.mark.parametrize("table,edit,message", [
    ("chexpert", lambda text: text + text.splitlines()[1] + "\n", "study_id 501 listed twice"),
    ("split", lambda text: text + "a1,501,11,test\n", "dicom_id a1 listed twice"),
    ("split", lambda text: text + " ,501,11,test\n", "blank dicom_id"),
])
def test_duplicate_or_blank_ids_in_cxr_tables_are_data_errors(tree, table, edit, message):
    path = tree / f"cxr/mimic-cxr-2.0.0-{table}.csv"
    path.write_text(edit(path.read_text()))
    last_row = len(path.read_text().splitlines())                 # the appended row
    with pytest.raises(DataError, match=message) as err:
        read(source(tree, task="radiology", ehr_root=""))
    assert path.name in str(err.value) and f"row {last_row}," in str(err.value)
