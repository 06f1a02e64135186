"""One writer per stage of a run directory (kdscale/runlock.py): a second `kdscale train` on the
same run directory is refused naming the holder's host and PID; a killed holder's lock is taken
over; array tasks with their own locks do not collide; a killed shard build's temp files are
removed at the next start, other tasks' are left alone."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shard_fixtures import build_fixture

from kdscale.runlock import RunLocked, lock_path, stage_lock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _wait_for_holder(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the first process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if path.is_file() and path.read_text().strip():
            return json.loads(path.read_text())
        time.sleep(0.2)
    raise AssertionError(f"no lock holder recorded in {path}")


def test_second_holder_refused_then_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kdscale.runlock import stage_lock\n"
                               "with stage_lock(sys.argv[1], 'eval'):\n    time.sleep(120)\n", str(tmp_path)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        record = _wait_for_holder(lock_path(tmp_path, "eval"), holder)
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        with pytest.raises(RunLocked) as info:
            with stage_lock(tmp_path, "eval"):
                pass
        assert f"PID {holder.pid}" in str(info.value) and socket.gethostname() in str(info.value)
        with stage_lock(tmp_path, "shards task 1"):   # another lock of the same folder: no conflict
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level("WARNING"), stage_lock(tmp_path, "eval") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"PID {holder.pid}" in caplog.text and "ended without releasing" in caplog.text
    assert lock_path(tmp_path, "eval").read_text() == ""        # released: emptied, never deleted


def test_only_rank0_locks():
    with stage_lock("/nonexistent/never/created", "softlabels", enabled=False) as path:
        assert path is None


def test_two_concurrent_train_runs_on_one_run_directory(tmp_path):
    from kdscale.config import dump, validate
    from kdscale.schema import Config

    shards = build_fixture(tmp_path / "data", n=30)
    cfg = validate(Config, {
        "run": {"out_dir": str(tmp_path / "run"), "seed": 0},
        "shards": {"out_dir": str(shards)},
        "loader": {"num_workers": 0, "batch_size": 2, "image_size": 16, "resize_size": 18},
        "students": [{"name": "ehr", "method": "supervised",
                      "model": {"kind": "unimodal", "modality": "ehr", "ehr_arch": "lstm_small"},
                      "train": {"epochs": 10000, "progress": False, "device": "cpu"}}]})
    dump(cfg, tmp_path / "cfg.yaml")
    command = [sys.executable, "-m", "kdscale.cli", "train", "--cfg", str(tmp_path / "cfg.yaml")]
    first = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(lock_path(tmp_path / "run" / "students" / "ehr", "student ehr"), first)
        second = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert "Traceback" not in second.stderr
    assert lines[-1].startswith("kdscale train: error: ") and "is in use by another kdscale process" in lines[-1]
    assert f"PID {first.pid}" in lines[-1] and socket.gethostname() in lines[-1]


def test_stale_temps_of_a_killed_build_are_removed_for_its_own_task_only(tmp_path):
    from kdscale.data.shards import BUILD_DIR, remove_stale_temps

    out = tmp_path / "shards"
    (out / BUILD_DIR).mkdir(parents=True)
    (out / "train").mkdir()
    names = ["_build/source_quarantine.0.111.tmp", "_build/source_quarantine.1.222.tmp",
             "train/shard-000000.tar.tmp-111", "train/shard-000001.tar.tmp-222",
             "train/shard-000002.stats.json.tmp-111", "_build/plan.json.tmp-111", "train/shard-000000.tar"]
    for name in names:
        (out / name).write_bytes(b"x")
    removed = remove_stale_temps(out, task_index=0, num_tasks=2)    # task 0 of 2 owns shards 0, 2, ...
    assert sorted(removed) == ["_build/source_quarantine.0.111.tmp", "train/shard-000000.tar.tmp-111",
                               "train/shard-000002.stats.json.tmp-111"]
    assert (out / "train/shard-000001.tar.tmp-222").exists() and (out / "_build/plan.json.tmp-111").exists()
    removed = remove_stale_temps(out, task_index=0, num_tasks=1)    # a whole build owns every temp file
    assert sorted(removed) == ["_build/plan.json.tmp-111", "train/shard-000001.tar.tmp-222"]
    assert (out / "train/shard-000000.tar").exists() and (out / "_build/source_quarantine.1.222.tmp").exists()


def test_the_pipeline_takes_the_same_locks_as_the_stage_commands(tmp_path):
    """`kdscale pipeline` runs the stage functions directly: a student (or the eval) being
    written by a `kdscale train` (or `kdscale eval`) of the same run directory stops it too."""
    from kdscale.distill.student_training import student_dir
    from kdscale.pipeline import stage_eval, stage_train
    from kdscale.schema import load_config

    cfg = load_config("configs/demo.yaml", [f"run.out_dir={tmp_path}"], base_dir=REPO)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kdscale.runlock import stage_lock\n"
                               "with stage_lock(sys.argv[1], sys.argv[2]):\n    time.sleep(120)\n",
         str(student_dir(cfg, cfg.students[0])), f"student {cfg.students[0].name}"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(lock_path(student_dir(cfg, cfg.students[0]), f"student {cfg.students[0].name}"), holder)
        with pytest.raises(RunLocked, match=f"pid {holder.pid}|PID {holder.pid}|{holder.pid}"):
            stage_train(cfg, tmp_path)
    finally:
        holder.kill()
        holder.wait()
    with stage_lock(tmp_path, "eval"):
        with pytest.raises(RunLocked):
            stage_eval(cfg, tmp_path)
