"""`python -m kdscale.data.demo.teacher_gaps`: a teacher's fraction of the way from chance (0.5)
to its modality's oracle ceiling, on a hand-made run whose answer can be checked by hand."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from kdscale.data.demo import teacher_gaps as tg
from kdscale.data.demo.mimic_demo import ORACLE_CSV
from kdscale.data.ingest import DataError
from kdscale.data.mimic_demo_signal import EHR_DRIVEN, IMAGE_DRIVEN, PHENOTYPES
from kdscale.data.record import safe_key
from kdscale.data.softlabel_format import FORMAT, SoftShard, write_soft_shard

# Four validation stays. On every image-drawn label the recorded labels are 0, 0, 1, 1 and the
# image teacher scores 0.1, 0.3, 0.2, 0.4: of the 4 (positive, negative) pairs, 3 are ordered
# right (0.2 > 0.1, 0.4 > 0.1, 0.4 > 0.3; 0.2 < 0.3), so AUROC = 0.75. The image oracle ranks
# them perfectly (0.2, 0.2, 0.9, 0.9: AUROC 1.0), so the teacher is (0.75 - 0.5) / (1.0 - 0.5)
# = 0.5 of the way. The EHR teacher's scores equal the EHR oracle's on the EHR-drawn labels
# (0.1, 0.3, 0.2, 0.4: AUROC 0.75 both), so it is 1.0 of the way.
STAYS = [("101", "1001"), ("102", "1002"), ("103", "1003"), ("104", "1004")]
Y = [0.0, 0.0, 1.0, 1.0]
IMAGE_TEACHER = [0.1, 0.3, 0.2, 0.4]
IMAGE_ORACLE = [0.2, 0.2, 0.9, 0.9]


def _column(name: str, values_image, values_ehr, fill):
    if name in IMAGE_DRIVEN:
        return values_image
    if name in EHR_DRIVEN:
        return values_ehr
    return fill


def _make_run(tmp_path):
    demo = tmp_path / "demo"
    listdir = demo / "mimic4extract" / "phenotyping"
    listdir.mkdir(parents=True)
    for split in ("train", "val", "test"):
        with open(listdir / f"{split}_listfile.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["stay", "period_length", "stay_id", *PHENOTYPES])
            if split == "val":
                for i, (subject, stay_id) in enumerate(STAYS):
                    labels = [Y[i] if n in IMAGE_DRIVEN or n in EHR_DRIVEN else float(i % 2) for n in PHENOTYPES]
                    w.writerow([f"{subject}_episode1_timeseries.csv", "48.0", stay_id, *[int(v) for v in labels]])
    keys = [safe_key(s, stay) for s, stay in STAYS]
    (demo / ORACLE_CSV).parent.mkdir(parents=True)
    with open(demo / ORACLE_CSV, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", *[f"{v}/{n}" for v in ("image", "ehr", "both") for n in PHENOTYPES]])
        for i, key in enumerate(keys):
            row = [key]
            for view in ("image", "ehr", "both"):
                row += [_column(n, IMAGE_ORACLE[i] if view != "ehr" else 0.5,
                                IMAGE_TEACHER[i] if view != "image" else 0.5, 0.5) for n in PHENOTYPES]
            w.writerow(row)

    soft = tmp_path / "run" / "softlabels"
    (soft / "val").mkdir(parents=True)
    c = len(PHENOTYPES)
    logits = np.zeros((4, 2, c), np.float32)   # teachers: cxr (image), lstm (ehr)
    for i in range(4):
        for j, n in enumerate(PHENOTYPES):
            logits[i, 0, j] = IMAGE_TEACHER[i] if n in IMAGE_DRIVEN else 0.0
            logits[i, 1, j] = IMAGE_TEACHER[i] if n in EHR_DRIVEN else 0.0
    write_soft_shard(soft / "val" / "shard-000000.tar", SoftShard(
        {"format": FORMAT}, keys, logits, np.ones((4, 2), bool), logits.copy(), np.ones((4, 2), bool)))
    (soft / "index.json").write_text(json.dumps({
        "format": FORMAT, "teacher_names": ["cxr", "lstm"], "ensemble_names": ["image", "ehr"],
        "teachers": [{"name": "cxr", "modality": "image"}, {"name": "lstm", "modality": "ehr"}]}))
    run = tmp_path / "run"
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"demo": {"out_dir": str(demo)}},
                                                     "softlabels": {"out_dir": str(soft)}}))
    return run, demo, soft


def test_fraction_of_the_way_by_hand(tmp_path):
    run, _, _ = _make_run(tmp_path)
    rows = {r["teacher"]: r for r in tg.teacher_gaps(run, "val")}
    assert set(rows) == {"cxr", "lstm", "ensemble image", "ensemble ehr"}
    cxr = rows["cxr"]
    assert (cxr["modality"], cxr["n"]) == ("image", 4)
    assert cxr["auroc_carried"] == pytest.approx(0.75)
    assert cxr["ceiling_carried"] == pytest.approx(1.0)
    assert cxr["fraction_of_way"] == pytest.approx(0.5)
    assert rows["lstm"]["auroc_carried"] == pytest.approx(0.75)
    assert rows["lstm"]["ceiling_carried"] == pytest.approx(0.75)
    assert rows["lstm"]["fraction_of_way"] == pytest.approx(1.0)
    # ensembles named after a modality are measured like their members
    assert rows["ensemble image"]["fraction_of_way"] == pytest.approx(0.5)


def test_report_teacher_is_measured_on_the_image_labels(tmp_path):
    run, _, soft = _make_run(tmp_path)
    index = json.loads((soft / "index.json").read_text())
    index["teachers"][0]["modality"] = "report"
    (soft / "index.json").write_text(json.dumps(index))
    row = next(r for r in tg.teacher_gaps(run, "val") if r["teacher"] == "cxr")
    assert row["modality"] == "report" and row["fraction_of_way"] == pytest.approx(0.5)


@pytest.mark.parametrize("missing", ["config", "oracle", "listfile", "index", "shards"])
def test_missing_run_file_is_an_error_naming_it(tmp_path, missing, capsys):
    run, demo, soft = _make_run(tmp_path)
    path = {"config": run / "config.yaml", "oracle": demo / ORACLE_CSV,
            "listfile": demo / "mimic4extract" / "phenotyping" / "test_listfile.csv",
            "index": soft / "index.json", "shards": soft / "val" / "shard-000000.tar"}[missing]
    path.unlink()
    named = path.parent if missing == "shards" else path
    with pytest.raises(DataError, match=f"file {named}"):
        tg.teacher_gaps(run, "val")
    with pytest.raises(SystemExit) as exit_info:      # the command: a one-line error, no traceback
        tg.main([str(run)])
    assert exit_info.value.code == 2
    assert str(named) in capsys.readouterr().err


def test_keys_of_another_demo_tree_are_an_error(tmp_path):
    run, demo, _ = _make_run(tmp_path)
    oracle = demo / ORACLE_CSV
    oracle.write_text(oracle.read_text().replace(safe_key(*STAYS[0]), "p999_s999"))
    with pytest.raises(DataError, match="not in the oracle CSV"):
        tg.teacher_gaps(run, "val")
