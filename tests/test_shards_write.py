"""Shard writer: verify round trip, tamper/duplicate/leakage detection, restart after SIGKILL,
task split, parallel workers, quarantine reconciliation."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from shard_fixtures import PYTHON, REPO, FakeSource, build_fixture, make_cfg, tar_hashes

from kdscale.data.ingest import DataError
from kdscale.data.shard_index import read_index, verify_shards
from kdscale.data.shards import build_shards
from kdscale.data.tario import TarShardWriter, iter_samples, sha256_file


def _members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _append_shard(shard_dir: Path, split: str, members: list[tuple[str, bytes]], count: int) -> None:
    """Add a hand-made shard to a split and register it in index.json with the right sha256."""
    name = "shard-000999.tar"
    writer = TarShardWriter(shard_dir / split / name)
    for member, data in members:
        writer.add(member, data)
    info = writer.commit()
    index = read_index(shard_dir, split)
    index["shards"].append({"name": name, "count": count, **info})
    index["num_samples"] += count
    (shard_dir / split / "index.json").write_text(json.dumps(index))


def test_write_then_verify_and_reconcile(tmp_path):
    shard_dir = build_fixture(tmp_path, n=30, source_bad=[4], writer_bad=[7])
    assert verify_shards(shard_dir) == []
    summary = json.loads((shard_dir / "build_summary.json").read_text())
    assert summary["reconciles"] and summary["read"] == 30
    assert summary["written"] == 28 and summary["quarantined"] == 2
    quarantine = [json.loads(line) for line in (shard_dir / "quarantine.jsonl").read_text().splitlines()]
    assert {q["reason"] for q in quarantine} == {"corrupt image", "unencodable sample"}
    assert any(q["key"] == "p3_s7" and "labels" in q["detail"] for q in quarantine)

    index = read_index(shard_dir, "train")
    assert index["label_names"] == ["opacity", "effusion", "edema"]
    assert index["num_samples"] == sum(s["count"] for s in index["shards"])
    assert set(index["presence"]) == {"image", "ehr", "report", "tabular"}
    assert index["ehr"]["normalizer"]["columns"] == ["Heart Rate", "Glucose"]   # masks not normalized
    assert read_index(shard_dir, "val")["ehr"]["normalizer"] == index["ehr"]["normalizer"]  # train's
    assert index["config_hash"] and index["kdscale_version"] and index["config"]["shards"]

    # per-shard presence (loader.require counts qualifying samples from these, without reading)
    for modality, total in index["presence"].items():
        assert sum(e["presence"][modality] for e in index["shards"]) == total
    for entry in index["shards"]:
        assert sum(entry["presence_patterns"].values()) == entry["count"]
        for modality, n in entry["presence"].items():
            assert sum(c for p, c in entry["presence_patterns"].items() if modality in p.split("+")) == n
    index["shards"][0]["presence"]["image"] += 1
    (shard_dir / "train" / "index.json").write_text(json.dumps(index))
    assert any("samples per modality" in p for p in verify_shards(shard_dir))
    index["shards"][0]["presence"]["image"] -= 1
    (shard_dir / "train" / "index.json").write_text(json.dumps(index))

    first = next(iter_samples(shard_dir / "train" / "shard-000000.tar"))
    meta = json.loads(first["json"])
    assert meta["members"][0] == "json" and set(meta["members"]) <= set(first)
    ehr = np.load(io.BytesIO(first["ehr.npy"]), allow_pickle=False)
    assert ehr.dtype == np.float32 and ehr.shape == (meta["ehr_len"], 4)


def test_resize_rescales_boxes_and_masks(tmp_path):
    cfg = make_cfg(tmp_path, "shards.image_resize=longer", "shards.image_resize_to=20")
    build_shards(cfg, source=FakeSource(n=8))
    from PIL import Image

    for sample in iter_samples(tmp_path / "shards" / "train" / "shard-000000.tar"):
        meta = json.loads(sample["json"])
        if not meta["present"]["image"]:
            continue
        with Image.open(io.BytesIO(sample[meta["image_ext"]])) as img:
            assert list(img.size) == meta["image_size"] and max(img.size) == 20
        sx = meta["image_size"][0] / meta["source_image_size"][0]
        for box in meta["boxes"]:
            assert box["x"] == pytest.approx(2.0 * sx) and box["w"] == pytest.approx(10.0 * sx)
            if box["mask"]:
                with Image.open(io.BytesIO(sample[box["mask"]])) as mask:
                    assert mask.width == round(10 * sx)


def test_verify_detects_tampering(tmp_path):
    shard_dir = build_fixture(tmp_path, n=12)
    target = shard_dir / "train" / "shard-000001.tar"
    data = bytearray(target.read_bytes())
    data[600] ^= 0xFF
    target.write_bytes(bytes(data))
    problems = verify_shards(shard_dir)
    assert any("train/shard-000001.tar" in p and "sha256" in p for p in problems), problems


def test_verify_detects_duplicate_key_and_leakage(tmp_path):
    shard_dir = build_fixture(tmp_path, n=12)
    stolen = _members(shard_dir / "train" / "shard-000000.tar")
    key = stolen[0][0].split(".")[0]
    stolen = [(n, d) for n, d in stolen if n.split(".")[0] == key]
    _append_shard(shard_dir, "val", stolen, 1)
    problems = verify_shards(shard_dir)
    assert any(f"key {key} also in train/shard-000000.tar" in p for p in problems), problems
    assert any("leakage" in p for p in problems), problems


def test_verify_rejects_unsafe_member_names(tmp_path):
    shard_dir = build_fixture(tmp_path, n=12)
    _append_shard(shard_dir, "test", [("evil/p99_s1.json", b"{}"), ("p99_s2.pyd", b"x")], 0)
    problems = verify_shards(shard_dir)
    assert any("path component" in p for p in problems), problems
    assert any("unknown extension 'pyd'" in p for p in problems), problems


def test_killed_build_resumes_to_identical_shards(tmp_path):
    reference = build_fixture(tmp_path / "ref", n=40)
    out = tmp_path / "killed"
    proc = subprocess.Popen([PYTHON, str(REPO / "tests" / "shard_fixtures.py"), str(out), "40", "0.05"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not list((out / "shards").glob("*/*.stats.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "shards" / "build_summary.json").exists(), "the build finished before the kill"
    summary = build_shards(make_cfg(out), source=FakeSource(n=40))
    assert summary["complete"] and summary["task"]["already_done"] >= 1
    assert tar_hashes(out / "shards") == tar_hashes(reference)
    assert not list((out / "shards").glob("*/*.tmp-*"))
    assert verify_shards(out / "shards") == []


def test_lost_markers_and_partial_files_are_rewritten_identically(tmp_path):
    shard_dir = build_fixture(tmp_path, n=30)
    before = tar_hashes(shard_dir)
    index_before = (shard_dir / "train" / "index.json").read_text()
    (shard_dir / "train" / "shard-000002.stats.json").unlink()          # killed before the marker
    (shard_dir / "val" / "shard-000000.tar").unlink()                   # killed before the rename
    (shard_dir / "val" / "shard-000000.stats.json").unlink()
    (shard_dir / "val" / "shard-000000.tar.tmp-123").write_bytes(b"partial")
    summary = build_shards(make_cfg(tmp_path), source=FakeSource(n=30))
    assert summary["task"]["written"] == 2
    assert tar_hashes(shard_dir) == before
    assert (shard_dir / "train" / "index.json").read_text() == index_before
    assert not (shard_dir / "val" / "shard-000000.tar.tmp-123").exists()


class _NoRead(FakeSource):
    def records(self, log):
        raise AssertionError("a finished build must not read the source again")


def test_finished_build_is_not_redone_and_other_config_is_refused(tmp_path):
    build_fixture(tmp_path, n=12)
    assert build_shards(make_cfg(tmp_path), source=_NoRead())["complete"]
    with pytest.raises(DataError, match="another data/shards config"):
        build_shards(make_cfg(tmp_path, "shards.max_samples_per_shard=5"), source=FakeSource(n=12))


def test_task_split_equals_single_build(tmp_path):
    single = build_fixture(tmp_path / "single", n=30)
    cfg = make_cfg(tmp_path / "tasks")
    results = [build_shards(cfg, task_index=i, num_tasks=3, source=FakeSource(n=30)) for i in range(3)]
    assert [r["complete"] for r in results] == [False, False, True]
    # train has shards 0-4, val and test 0-1: task i writes shard k of each split where k % 3 == i
    assert [r["task"]["written"] for r in results] == [4, 4, 1]
    assert tar_hashes(tmp_path / "tasks" / "shards") == tar_hashes(single)
    for split in ("train", "val", "test"):
        a, b = read_index(single, split), read_index(tmp_path / "tasks" / "shards", split)
        for index in (a, b):  # these two name run.out_dir, which differs here on purpose
            index.pop("config"), index.pop("config_hash")
        assert a == b


def test_parallel_workers_and_byte_limit_are_deterministic(tmp_path):
    overrides = ("shards.max_samples_per_shard=100", "shards.max_bytes_per_shard=4000")
    a = build_shards(make_cfg(tmp_path / "a", *overrides), workers=1, source=FakeSource(n=24))
    b = build_shards(make_cfg(tmp_path / "b", *overrides), workers=2, source=FakeSource(n=24))
    assert a["splits"] == b["splits"] and a["splits"]["train"]["shards"] > 1
    assert tar_hashes(tmp_path / "a" / "shards") == tar_hashes(tmp_path / "b" / "shards")
    for stats in (tmp_path / "a" / "shards").glob("*/*.stats.json"):
        assert sha256_file(stats.with_name(json.loads(stats.read_text())["shard"])) == \
            json.loads(stats.read_text())["sha256"]
    assert os.listdir(tmp_path / "b" / "shards" / "_build") == os.listdir(tmp_path / "a" / "shards" / "_build")
