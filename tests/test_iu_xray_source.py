"""IU X-ray report source: the REAL NLMCXR_reports.tgz through configs/data/iu_xray.yaml (counts,
label prevalences, hand-checked reports, splits), bad input in hand-built archives, and the
``kdscale inspect`` / ``shards`` / ``verify`` commands end to end."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import missing_real_data
from kdscale.config import ConfigError
from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.sources import build_source
from kdscale.data.sources.iu_xray import IuLabelSpec, IuXrayConfig, IuXraySource
from kdscale.schema import load_config

CONFIG = "configs/data/iu_xray.yaml"
ARCHIVE = "iu-xray-reports/NLMCXR_reports.tgz"
SECRET = "SECRET-REPORT-TEXT"
LABELS = ["abnormal", "cardiomegaly", "opacity", "atelectasis", "effusion", "granuloma"]


def read(source, **log_kwargs):
    log = IngestLog("iu_xray", **log_kwargs)
    records = list(source.records(log))
    assert log.read == log.kept + log.n_skipped
    return records, log


# ---------------------------------------------------------------------------------------------
# Hand-built archives
# ---------------------------------------------------------------------------------------------

def report_xml(rid, findings="", impression="", majors=("normal",), images=("IM-1",), indication="") -> bytes:
    sections = "".join(f'<AbstractText Label="{label}">{text}</AbstractText>' if text else
                       f'<AbstractText Label="{label}"/>'
                       for label, text in (("COMPARISON", ""), ("INDICATION", indication),
                                           ("FINDINGS", findings), ("IMPRESSION", impression)))
    mesh = "".join(f"<major>{m}</major>" for m in majors) + "<automatic>Cardiomegaly</automatic>"
    imgs = "".join(f'<parentImage id="{i}"><figureId>F1</figureId></parentImage>' for i in images)
    return (f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR{rid}"/>'
            f'<IUXRId id="{rid}"/><MedlineCitation><Article><Abstract>{sections}</Abstract></Article>'
            f'</MedlineCitation><MeSH>{mesh}</MeSH>{imgs}</eCitation>').encode()


def write_tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("ecgen-radiology")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(f"ecgen-radiology/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def source(archive: Path, **kwargs) -> IuXraySource:
    return IuXraySource(IuXrayConfig(archive=str(archive), **kwargs))


def test_text_labels_and_meta(tmp_path):
    archive = write_tgz(tmp_path / "r.tgz", {
        "1.xml": report_xml(1, f"  {SECRET} heart XXXX.  ", " No acute disease. ", ["normal"], ["A-1", "A-2"]),
        "2.xml": report_xml(2, "", "Big heart.", ["Cardiomegaly/mild", "Opacity/lung/base/left",
                                                   "Calcified Granuloma/lung", "technical quality "], []),
        "3.xml": report_xml(3, "Clear.", "", ["No Indexing"]),
        "4.xml": report_xml(4, "Low volumes.", "x", ["pulmonary atelectasis/base", "Pleural Effusion"]),
    })
    records, log = read(source(archive))
    assert [r.key for r in records] == ["iu_1", "iu_2", "iu_3", "iu_4"] and log.n_skipped == 0
    r1, r2, r3, r4 = records
    assert r1.report == f"{SECRET} heart XXXX.\nNo acute disease." and r2.report == "Big heart."
    assert r1.image is None and r1.patient_id == "1"
    assert r1.labels.tolist() == [0, 0, 0, 0, 0, 0]
    assert r2.labels.tolist() == [1, 1, 1, 0, 0, 1]
    assert np.isnan(r3.labels).all() and log.notes["report not indexed (labels unknown)"] == 1
    assert r4.labels.tolist() == [1, 0, 0, 1, 1, 0]  # case-insensitive first component
    assert r1.meta["image_ids"] == ["A-1", "A-2"] and r2.meta["image_ids"] == []
    assert log.notes["report lists no images"] == 1
    assert r2.meta["mesh_major"][0] == "Cardiomegaly/mild" and r1.meta["source_member"] == "ecgen-radiology/1.xml"
    # other sections and the not-indexed policies
    (r1, *_), _ = read(source(archive, sections=["INDICATION", "IMPRESSION"],
                              labels=[IuLabelSpec("normal", mesh=["NORMAL"])]))
    assert r1.report == "No acute disease." and r1.labels.tolist() == [1.0]
    records, _ = read(source(archive, sections=["IMPRESSION", "FINDINGS"], unindexed="negative"))
    assert records[0].report == f"No acute disease.\n{SECRET} heart XXXX." and records[2].labels.tolist() == [0] * 6
    records, log = read(source(archive, unindexed="skip"))
    assert len(records) == 3 and dict(log.skipped) == {"not indexed": 1}


def test_malformed_and_empty_reports_are_counted_skips(tmp_path, caplog):
    archive = write_tgz(tmp_path / "r.tgz", {
        "1.xml": report_xml(1, "Fine.", "Normal."),
        "2.xml": report_xml(2, f"{SECRET} cut", "Normal.")[:-40],            # truncated: not well-formed
        "3.xml": report_xml(3, "", "", indication=f"{SECRET} cough"),        # FINDINGS/IMPRESSION empty
        "4.xml": report_xml(4, "Also fine.", "")
                 .replace(b'<IUXRId id="4"/>', b""),                           # no report id
        "README.txt": b"not a report",
    })
    quarantine = tmp_path / "out/quarantine.jsonl"
    with caplog.at_level(logging.WARNING):
        records, log = read(source(archive), quarantine_path=quarantine)
    log.close()
    assert [r.key for r in records] == ["iu_1"]
    assert (log.read, log.kept) == (4, 1) and log.notes["non-XML archive member ignored"] == 1
    assert dict(log.skipped) == {"malformed XML": 1, "report text empty": 1, "missing report id": 1}
    entries = {e["reason"]: e for e in map(json.loads, quarantine.read_text().splitlines())}
    assert entries["malformed XML"]["detail"].startswith("ecgen-radiology/2.xml: ")
    assert entries["report text empty"]["detail"].startswith("ecgen-radiology/3.xml: ")
    assert entries["report text empty"]["key"] == "iu_3" and entries["malformed XML"]["file"] == str(archive)
    assert "ecgen-radiology/2.xml" in caplog.text
    assert SECRET not in quarantine.read_text() and SECRET not in caplog.text
    with pytest.raises(DataError, match=r"malformed XML.*ecgen-radiology/2\.xml"):
        read(source(archive), on_bad_sample="error")


def test_missing_or_broken_archive_is_a_data_error(tmp_path, repo_root, monkeypatch):
    missing = tmp_path / "nowhere/NLMCXR_reports.tgz"
    with pytest.raises(DataError, match=r"archive not found.*nowhere/NLMCXR_reports\.tgz"):
        read(source(missing))
    monkeypatch.chdir(repo_root)
    with pytest.raises(ConfigError, match=r"data\.iu_xray\.archive.*path does not exist.*nowhere"):
        load_config(CONFIG, [f"data.iu_xray.archive={missing}"])
    (tmp_path / "junk.tgz").write_bytes(b"this is no archive")
    with pytest.raises(DataError, match=r"unreadable IU X-ray report archive.*junk\.tgz"):
        read(source(tmp_path / "junk.tgz"))
    good = write_tgz(tmp_path / "good.tgz", {f"{i}.xml": report_xml(i, "x" * 3000, "y") for i in range(30)})
    (tmp_path / "cut.tgz").write_bytes(good.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"unreadable IU X-ray report archive.*cut\.tgz"):
        read(source(tmp_path / "cut.tgz"))


def test_config_validation(tmp_path):
    archive = write_tgz(tmp_path / "r.tgz", {})
    with pytest.raises(ValueError, match="with_images"):
        IuXrayConfig(archive=str(archive), with_images=True)
    with pytest.raises(ValueError, match="unknown report section"):
        IuXrayConfig(archive=str(archive), sections=["FINDING"])
    with pytest.raises(ValueError, match="exactly one of 'mesh' and 'none_of'"):
        IuLabelSpec("x")
    with pytest.raises(ValueError, match="sum to 1"):
        IuXrayConfig(archive=str(archive), split_fractions={"train": 0.7, "test": 0.2})


# ---------------------------------------------------------------------------------------------
# The real IU X-ray report archive
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def real_archive(shared_data, repo_root, monkeypatch) -> Path:
    if not (shared_data / ARCHIVE).is_file():
        missing_real_data(f"real archive {shared_data / ARCHIVE} is absent")
    monkeypatch.chdir(repo_root)
    return shared_data / ARCHIVE


def test_real_iu_xray(real_archive):
    cfg = load_config(CONFIG)
    src = build_source(cfg.data)
    records, log = read(src)
    assert (log.read, log.kept, log.n_skipped) == (3955, 3927, 28)
    assert dict(log.skipped) == {"report text empty": 28}
    assert dict(log.notes) == {"report not indexed (labels unknown)": 95, "report lists no images": 101}
    assert src.label_names == LABELS
    labels = np.stack([r.labels for r in records])
    unknown = np.isnan(labels)
    assert (unknown.any(axis=1) == unknown.all(axis=1)).all() and unknown.all(axis=1).sum() == 95
    assert np.nansum(labels, axis=0).tolist() == [2469, 375, 569, 332, 161, 421]
    assert len({r.key for r in records}) == 3927 and all(r.image is None and r.report for r in records)
    splits = Counter(r.split for r in records)
    assert splits == {"train": 2762, "val": 595, "test": 570}
    for split, frac in cfg.data.iu_xray.split_fractions.items():
        assert abs(splits[split] / len(records) - frac) < 0.02

    by_key = {r.key: r for r in records}
    # ecgen-radiology/1230.xml (inspected by hand): FINDINGS empty; IMPRESSION "Left lung clear.
    # Slight cardiomegaly. Right effusion. Right lower lobe infiltrate. ..."; major terms
    # Cardiomegaly/mild, Pleural Effusion/right, Infiltrate/lung/lower lobe/right, Hydropneumothorax/right.
    r = by_key["iu_1230"]
    assert r.labels.tolist() == [1, 1, 1, 0, 1, 0]
    assert r.report.startswith("Left lung clear. Slight cardiomegaly.") and "\n" not in r.report
    assert "XXXX" in r.report and "followup consolidation" not in r.report  # INDICATION not included
    assert r.meta["mesh_major"] == ["Cardiomegaly/mild", "Pleural Effusion/right",
                                    "Infiltrate/lung/lower lobe/right", "Hydropneumothorax/right"]
    assert r.meta["image_ids"] == ["CXR1230_IM-0154-0001", "CXR1230_IM-0154-1001", "CXR1230_IM-0154-2001"]
    # ecgen-radiology/1.xml: indexed "normal"; FINDINGS then IMPRESSION "Normal chest x-XXXX."
    r = by_key["iu_1"]
    assert r.labels.tolist() == [0] * 6 and r.report.endswith("pneumothorax.\nNormal chest x-XXXX.")
    assert r.report.startswith("The cardiac silhouette and mediastinum size are within normal limits.")
    assert r.meta["image_ids"] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    # ecgen-radiology/1023.xml: indexed "No Indexing" only -> labels unknown
    assert np.isnan(by_key["iu_1023"].labels).all() and by_key["iu_1023"].meta["mesh_major"] == ["No Indexing"]
    assert "iu_1137" not in by_key  # FINDINGS and IMPRESSION both empty: a counted skip


def test_cli_inspect_shards_verify(real_archive, tmp_path):
    from kdscale.data.tario import iter_samples

    kdscale = [sys.executable, "-m", "kdscale.cli"]
    out = tmp_path / "run"

    def run(*args):
        result = subprocess.run([*kdscale, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    text = run("inspect", "--cfg", CONFIG, f"run.out_dir={out}")
    assert "read 3955, kept 3927, skipped 28" in text and "Normal chest" not in text
    summary = json.loads((out / "inspect/data_summary.json").read_text())
    assert summary["ingest"]["reconciles"] and summary["source"]["modalities"] == ["report"]
    assert summary["data"]["label_names"] == LABELS
    run("shards", "--cfg", CONFIG, f"run.out_dir={out}", "--no-progress")
    build = json.loads((out / "shards/build_summary.json").read_text())
    assert (build["read"], build["written"], build["quarantined"], build["reconciles"]) == (3955, 3927, 28, True)
    assert "OK" in run("verify", str(out / "shards"))
    index = json.loads((out / "shards/test/index.json").read_text())
    assert index["presence"]["image"] == 0 and index["presence"]["report"] == index["num_samples"] == 570
    sample = next(iter_samples(out / "shards/test/shard-000000.tar"))
    assert sample["__key__"].startswith("iu_") and {"json", "txt", "labels.npy"} <= set(sample)
    assert json.loads(sample["json"])["meta"]["report_id"] == sample["__key__"][len("iu_"):]
