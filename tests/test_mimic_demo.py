"""The MIMIC demo tree: deterministic, readable by MimicSource, signal and corruption as designed."""
import hashlib
from pathlib import Path

import pytest

from kdscale.data.demo.mimic_demo import generate_mimic_demo, mimic_config_for_demo
from kdscale.data.ingest import IngestLog
from kdscale.data.sources.mimic import MimicSource

N = 60


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, generate_mimic_demo(root, n_stays=N, seed=3)


def read(root, task, cohort):
    log = IngestLog("mimic")
    records = list(MimicSource(mimic_config_for_demo(root, task, cohort)).records(log))
    assert log.summary()["reconciles"]
    return records, log


def test_deterministic_for_a_seed(clean, tmp_path):
    root, summary = clean
    again = generate_mimic_demo(tmp_path / "again", n_stays=N, seed=3)
    assert again == summary
    assert digest(tmp_path / "again") == digest(root)
    other = generate_mimic_demo(tmp_path / "other", n_stays=N, seed=4)
    assert digest(tmp_path / "other") != digest(root) and other["n_stays"] == N


def test_demo_files_and_summary(clean):
    root, s = clean
    for rel in ("mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-jpg/mimic-cxr-2.0.0-chexpert.csv",
                "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv", "mimic4extract/root/all_stays.csv",
                "mimic4extract/phenotyping/val_listfile.csv", "mimic4extract/in-hospital-mortality/test_listfile.csv",
                "ms-cxr/MS_CXR_Local_Alignment_v1.1.0.csv"):
        assert (root / rel).is_file(), rel
    assert s["n_stays"] == N and s["images"] > 2 * s["paired"]["phenotyping"]["paired"]
    assert s["labels"]["image_driven"] and s["labels"]["ehr_driven"]
    assert s["n_subjects_without_stays"] > 0 and s["studies_without_report"] >= 0


@pytest.mark.parametrize("task", ["in-hospital-mortality", "phenotyping"])
def test_ehr_tasks_read_with_zero_skips_and_designed_pairing(clean, task):
    root, s = clean
    paired, log = read(root, task, "paired")
    assert log.skipped == {} and log.read == s["paired"][task]["paired"]
    assert {r.meta["stay_id"]: r.meta["dicom_id"] for r in paired} == s["paired_dicoms"][task]
    partial, log = read(root, task, "partial")
    assert log.skipped == {} and len(partial) == s["paired"][task]["stays"]
    assert all(r.ehr.shape[1] == 76 for r in partial)
    fraction = len(paired) / len(partial)
    if task == "in-hospital-mortality":
        assert abs(fraction - 0.25) < 0.03          # exactly 25% by design, up to rounding
        assert all(r.ehr.shape[0] == 48 for r in partial)
    else:
        assert 0.25 <= fraction < 0.40              # + films only after 48 h
    assert {r.split for r in partial} == {"train", "val", "test"}


def test_radiology_reads_with_zero_skips(clean):
    root, s = clean
    records, log = read(root, "radiology", "partial")
    assert log.skipped == {} and 0 < len(records) <= s["images"]
    assert sum(bool(r.boxes) for r in records) > 0 and sum(r.report is not None for r in records) > 0
    assert all(r.image_size == (256, 320) for r in records)


def test_corruption_is_counted(tmp_path):
    s = generate_mimic_demo(tmp_path, n_stays=40, seed=1, corrupt_fraction=0.1)
    assert s["corrupt"]["images"] and s["corrupt"]["series"]
    for task in ("in-hospital-mortality", "phenotyping", "radiology"):
        records, log = read(tmp_path, task, "partial")
        assert log.n_skipped > 0, task
        assert log.read == log.kept + log.n_skipped
    assert "corrupt image" in log.skipped
