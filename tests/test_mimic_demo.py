"""The MIMIC demo tree: deterministic, readable by MimicSource, signal and corruption as designed."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

from kdscale.data.demo.mimic_demo import (LATE_ONLY_FRACTION, PAIRED_FRACTION, generate_mimic_demo,
                                         mimic_config_for_demo)
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
    # the designed label groups are real phenotyping labels, disjoint, as the reader sees them
    names = MimicSource(mimic_config_for_demo(root, "phenotyping", "partial")).label_names
    image_driven, ehr_driven = set(s["labels"]["image_driven"]), set(s["labels"]["ehr_driven"])
    assert image_driven and ehr_driven and not image_driven & ehr_driven
    assert image_driven <= set(names) and ehr_driven <= set(names)
    assert s["n_subjects_without_stays"] > 0 and s["studies_without_report"] > 0
    assert s["reports"] + s["studies_without_report"] == s["n_studies"]


@pytest.mark.parametrize("task", ["in-hospital-mortality", "phenotyping"])
def test_ehr_tasks_read_with_zero_skips_and_designed_pairing(clean, task):
    root, s = clean
    paired, log = read(root, task, "paired")
    assert log.skipped == {} and log.read == s["paired"][task]["paired"]
    assert {r.meta["stay_id"]: r.meta["dicom_id"] for r in paired} == s["paired_dicoms"][task]
    partial, log = read(root, task, "partial")
    assert log.skipped == {} and len(partial) == s["paired"][task]["stays"]
    assert all(r.ehr.shape[1] == 76 for r in partial)
    for split, design in PAIRED_FRACTION.items():   # exactly the design share per split, up to rounding
        n_split = sum(r.split == split for r in partial)
        n_paired = sum(r.split == split for r in paired)
        if task == "in-hospital-mortality":
            assert abs(n_paired - design * n_split) <= 0.5, split
        else:                                        # + films only after 48 h
            assert design * n_split - 1 <= n_paired <= design * n_split + 1 + LATE_ONLY_FRACTION * len(partial)
    if task == "in-hospital-mortality":
        assert all(r.ehr.shape[0] == 48 for r in partial)
    assert {r.split for r in partial} == {"train", "val", "test"}


def test_radiology_reads_with_zero_skips(clean):
    root, s = clean
    records, log = read(root, "radiology", "partial")
    assert log.skipped == {} and 0 < len(records) <= s["images"]
    assert sum(bool(r.boxes) for r in records) > 0 and sum(r.report is not None for r in records) > 0
    assert log.notes["image without a report file"] == sum(r.report is None for r in records) > 0
    assert all(r.image_size == (256, 320) for r in records)


def test_corruption_is_counted(tmp_path):
    s = generate_mimic_demo(tmp_path, n_stays=40, seed=1, corrupt_fraction=0.1)
    assert s["corrupt"]["images"] and s["corrupt"]["series"]
    kept_ehr_only = 0
    for task in ("in-hospital-mortality", "phenotyping", "radiology"):
        records, log = read(tmp_path, task, "partial")
        assert log.n_skipped > 0, task
        assert log.read == log.kept + log.n_skipped
        kept_ehr_only += log.notes["partial cohort: corrupt image, stay kept EHR-only"]
    assert "corrupt image" in log.skipped        # radiology: the image is the sample
    assert kept_ehr_only > 0                     # EHR tasks: a corrupt paired film keeps the stay


def test_demo_signal_is_learnable(tmp_path):
    """EHR-driven phenotypes are predictable from simple EHR summaries (per-feature means over
    time) and image-driven ones come with lesion boxes on the paired films."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    s = generate_mimic_demo(tmp_path, n_stays=300, seed=0)
    src = MimicSource(mimic_config_for_demo(tmp_path, "phenotyping", "partial"))
    log = IngestLog("mimic")
    records = list(src.records(log))
    assert log.n_skipped == 0 and len(records) == 300
    by_split = {sp: [r for r in records if r.split == sp] for sp in ("train", "val", "test")}
    X = {sp: np.stack([r.ehr.mean(axis=0) for r in rs]) for sp, rs in by_split.items()}
    Y = {sp: np.stack([r.labels for r in rs]) for sp, rs in by_split.items()}
    mu, sd = X["train"].mean(axis=0), X["train"].std(axis=0) + 1e-6
    learnable = []
    for label in s["labels"]["ehr_driven"]:
        j = src.label_names.index(label)
        if len(set(Y["train"][:, j])) < 2 or any(len(set(Y[sp][:, j])) < 2 for sp in ("val", "test")):
            continue
        model = LogisticRegression(max_iter=2000, C=0.3).fit((X["train"] - mu) / sd, Y["train"][:, j])
        aucs = [roc_auc_score(Y[sp][:, j], model.predict_proba((X[sp] - mu) / sd)[:, 1]) for sp in ("val", "test")]
        if min(aucs) > 0.65:
            learnable.append(label)
    assert learnable, "no EHR-driven label is learnable from EHR summaries"
    # image-driven labels: positives' films carry recorded lesion boxes, negatives' mostly do not
    img = [src.label_names.index(label) for label in s["labels"]["image_driven"]]
    with_image = [r for r in records if r.image is not None]
    pos = [r for r in with_image if r.labels[img].max() == 1]
    neg = [r for r in with_image if r.labels[img].max() == 0]
    assert pos and neg
    assert np.mean([bool(r.boxes) for r in pos]) > 0.7 > 0.3 > np.mean([bool(r.boxes) for r in neg])
