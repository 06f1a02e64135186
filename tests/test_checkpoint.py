"""Tests for kdscale.engine.checkpoint and kdscale.engine.rng (CPU only, < 15 s)."""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdscale.engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    UnsafeCheckpointValueError,
    check_weights_only_safe,
    load_checkpoint,
    save_atomic,
)
from kdscale.engine.rng import capture_rng_state, restore_rng_state, seed_everything

REPO_ROOT = Path(__file__).resolve().parent.parent


def _trainer_like_state(step: int = 7) -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    scaler = torch.amp.GradScaler("cpu")
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": capture_rng_state(),
        "epoch": 1,
        "step": step,
        "loader": {"epoch": 1, "position": 123, "order": [3, 1, 2]},
        "config_hash": "abc123",
    }


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def _flip_byte_in_member(path: Path, member_suffix: str, delta: int = 1) -> None:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + delta] ^= 0xFF
    path.write_bytes(bytes(data))


def _tmp_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp." in p.name)


# --------------------------------------------------------------------------- save_atomic / load


def test_save_load_round_trip_trainer_state(tmp_path):
    state = _trainer_like_state()
    check_weights_only_safe(state)
    p = save_atomic(state, tmp_path / "sub" / "x.pt")
    assert p == tmp_path / "sub" / "x.pt"
    loaded = load_checkpoint(p)
    _assert_same(state, loaded)
    assert vars(loaded["model"]) == vars(state["model"])  # state_dict()._metadata survives
    assert _tmp_files(tmp_path / "sub") == []


def test_save_atomic_failure_keeps_old_file_and_no_temp(tmp_path):
    p = tmp_path / "x.pt"
    save_atomic({"v": torch.tensor(1)}, p)
    with pytest.raises(Exception):
        save_atomic({"v": lambda: 0}, p)  # unpicklable: fails halfway through torch.save
    assert load_checkpoint(p)["v"].item() == 1
    assert _tmp_files(tmp_path) == []


def test_load_checkpoint_errors_name_path_and_cause(tmp_path):
    good = save_atomic({"w": torch.randn(1000)}, tmp_path / "good.pt")
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(truncated)
    assert str(truncated) in str(ei.value) and "truncated or corrupt" in str(ei.value)
    assert not isinstance(ei.value, (zipfile.BadZipFile, EOFError))
    assert ei.value.__cause__ is not None

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt"):
        load_checkpoint(empty)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"x": collections.defaultdict(int)}, unsafe)  # bypasses the safety check
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(unsafe)

    notdict = save_atomic([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(notdict)

    with pytest.raises(CheckpointNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


# --------------------------------------------------------------------------- weights_only safety


def test_weights_only_check_names_key_path(tmp_path):
    state = _trainer_like_state()
    state["optimizer"]["x"] = object()
    with pytest.raises(UnsafeCheckpointValueError) as ei:
        check_weights_only_safe(state)
    assert 'state["optimizer"]["x"]' in str(ei.value) and "object" in str(ei.value)

    mgr = CheckpointManager(tmp_path / "ck")
    with pytest.raises(UnsafeCheckpointValueError, match=r'state\["optimizer"\]\["x"\]'):
        mgr.save(state, epoch=0, step=1)
    assert list((tmp_path / "ck").iterdir()) == []  # caught before anything was written

    with pytest.raises(UnsafeCheckpointValueError, match=r'state\["loader"\]\["order"\]\[1\].*numpy.*item\(\)'):
        check_weights_only_safe({"loader": {"order": [1, np.int64(2)]}})
    with pytest.raises(UnsafeCheckpointValueError, match=r'state\["m"\].*state_dict\(\)'):
        check_weights_only_safe({"m": torch.nn.Linear(1, 1)})
    with pytest.raises(UnsafeCheckpointValueError, match=r'state\["d"\] has a key'):
        check_weights_only_safe({"d": {object(): 1}})
    with pytest.raises(UnsafeCheckpointValueError, match=r'state\["f"\]'):
        check_weights_only_safe({"f": np.float64(1.0)})  # a float subclass: still rejected


def test_every_accepted_type_really_loads_weights_only(tmp_path):
    cyclic: list = [1]
    cyclic.append(cyclic)
    state = {
        "t": torch.arange(3),
        "p": torch.nn.Parameter(torch.ones(2)),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "scalars": [1, 2.5, 1j, True, None, "s", b"b", bytearray(b"x"), float("inf"), float("nan"), 2**80],
        "torch_meta": [torch.float16, torch.device("cpu"), torch.Size([2, 3]), torch.strided],
        "tuple": (1, (2, 3)),
        "set": {1, "a", (2, 3)},
        "od": collections.OrderedDict(a=1),
        3: {(1, 2): "tuple key", 4: "int key"},
        "cycle": cyclic,
    }
    check_weights_only_safe(state)
    del state["cycle"]  # cycles pass the check; compare the rest structurally
    loaded = load_checkpoint(save_atomic(state, tmp_path / "all.pt"))
    assert loaded["set"] == state["set"] and loaded[3] == state[3]
    assert loaded["torch_meta"] == state["torch_meta"] and loaded["tuple"] == state["tuple"]
    assert type(loaded["od"]) is collections.OrderedDict
    assert math.isnan(loaded["scalars"][9]) and loaded["scalars"][:9] == state["scalars"][:9]


# --------------------------------------------------------------------------- manager


def _state(step: int) -> dict:
    return {"step": step, "w": torch.full((8,), float(step))}


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("ckpt-*.pt"))


def test_keep_last_pruning_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    assert mgr.latest() is None and mgr.best() is None and mgr.best_metric is None
    for i in range(1, 6):
        p = mgr.save(_state(i), epoch=i // 2, step=i * 10)
        assert p.name == f"ckpt-e{i // 2:03d}-s{i * 10:08d}.pt"
    assert _names(tmp_path) == ["ckpt-e001-s00000030.pt", "ckpt-e002-s00000040.pt", "ckpt-e002-s00000050.pt"]
    assert mgr.latest() == tmp_path / "ckpt-e002-s00000050.pt"
    meta = json.loads((tmp_path / "latest.json").read_text())
    assert (meta["name"], meta["epoch"], meta["step"], meta["metric"]) == ("ckpt-e002-s00000050.pt", 2, 50, None)
    assert isinstance(meta["time"], float)
    assert mgr.resolve("latest") == mgr.latest()
    assert load_checkpoint(mgr.resolve("latest"))["step"] == 5

    # a save that sorts before existing files (e.g. after resuming from an earlier point) is latest and kept
    mgr1 = CheckpointManager(tmp_path, keep_last=1)
    p = mgr1.save(_state(99), epoch=0, step=1)
    assert p.exists() and mgr1.latest() == p
    assert _names(tmp_path) == ["ckpt-e000-s00000001.pt", "ckpt-e002-s00000050.pt"]

    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, mode="maximum")


def test_best_tracking_max_survives_pruning_and_restart(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1, mode="max")
    metrics = [0.5, 0.7, 0.6, float("nan"), 0.69, None]
    for i, m in enumerate(metrics):
        mgr.save(_state(i), epoch=0, step=i, metric=m)
    assert mgr.best_metric == 0.7
    assert _names(tmp_path) == ["ckpt-e000-s00000005.pt"]  # step 1's file was pruned ...
    assert load_checkpoint(mgr.best())["step"] == 1  # ... best.pt is independent of it
    assert mgr.resolve("best") == tmp_path / "best.pt"
    best_meta = json.loads((tmp_path / "best.json").read_text())
    assert (best_meta["name"], best_meta["step"], best_meta["metric"], best_meta["mode"]) == (
        "ckpt-e000-s00000001.pt", 1, 0.7, "max",
    )
    # overwriting the step file best.pt was linked from leaves best.pt alone
    mgr2 = CheckpointManager(tmp_path, keep_last=5, mode="max")
    assert mgr2.best_metric == 0.7  # read back from best.json
    mgr2.save(_state(1000), epoch=0, step=1, metric=0.1)
    assert load_checkpoint(mgr2.best())["step"] == 1
    mgr2.save(_state(2000), epoch=0, step=9, metric=0.71)
    assert mgr2.best_metric == 0.71 and load_checkpoint(mgr2.best())["step"] == 2000


def test_best_tracking_min_and_nan(tmp_path):
    mgr = CheckpointManager(tmp_path / "min", mode="min")
    for i, m in enumerate([0.5, 0.3, 0.4, float("nan"), 0.3]):
        mgr.save(_state(i), epoch=0, step=i, metric=m)
    assert mgr.best_metric == 0.3 and load_checkpoint(mgr.best())["step"] == 1  # ties do not improve

    nan_only = CheckpointManager(tmp_path / "nan", mode="min")
    nan_only.save(_state(0), epoch=0, step=0, metric=float("nan"))
    nan_only.save(_state(1), epoch=0, step=1, metric=torch.tensor(float("nan")))
    assert nan_only.best_metric is None and nan_only.best() is None
    assert not (tmp_path / "nan" / "best.pt").exists()
    with pytest.raises(CheckpointNotFoundError, match="no best checkpoint in"):
        nan_only.resolve("best")
    assert math.isnan(json.loads((tmp_path / "nan" / "latest.json").read_text())["metric"])


def test_resolve_errors_and_paths(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path / "run")
    with pytest.raises(CheckpointNotFoundError, match=f"no checkpoint in {tmp_path / 'run'} to resume from"):
        mgr.resolve("latest")
    p = mgr.save(_state(1), epoch=0, step=1)
    monkeypatch.chdir(tmp_path)
    assert mgr.resolve(p.name) == p  # relative to the checkpoint dir
    assert mgr.resolve(str(p)) == p and mgr.resolve(p) == p
    assert mgr.resolve(Path("run") / p.name) == Path("run") / p.name  # relative to cwd
    with pytest.raises(CheckpointNotFoundError, match="missing.pt"):
        mgr.resolve("missing.pt")
    state, path = mgr.load()
    assert path == p and state["step"] == 1


def test_latest_fallback_on_corrupt_or_missing_target(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for i in range(1, 4):
        mgr.save(_state(i), epoch=0, step=i)
    newest = tmp_path / "ckpt-e000-s00000003.pt"

    # latest.json itself corrupt
    (tmp_path / "latest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="kdscale.engine.checkpoint"):
        assert mgr.latest() == newest
    assert "latest.json" in caplog.text and "falling back" in caplog.text

    # latest.json points to a truncated file -> previous loadable one
    mgr.save(_state(4), epoch=0, step=4)
    target = tmp_path / "ckpt-e000-s00000004.pt"
    target.write_bytes(target.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdscale.engine.checkpoint"):
        assert CheckpointManager(tmp_path).latest() == newest
    assert target.name in caplog.text and "falling back" in caplog.text

    # latest.json points to a missing file
    target.unlink()
    assert mgr.latest() == newest

    # bit rot inside the tensor data of a structurally complete newest file: torch.load alone
    # would not notice; load("latest") verifies CRCs and falls back
    (tmp_path / "latest.json").unlink()
    good = tmp_path / "ckpt-e000-s00000002.pt"
    _flip_byte_in_member(newest, "/data/0")
    assert mgr.latest() == newest  # cheap structural check cannot see it
    with pytest.raises(CheckpointError, match="CRC mismatch"):
        load_checkpoint(newest)
    assert load_checkpoint(newest, verify=False)["w"][0].item() != 3.0  # silent without verify
    with caplog.at_level(logging.WARNING, logger="kdscale.engine.checkpoint"):
        state, path = mgr.load("latest")
    assert path == good and state["step"] == 2
    with pytest.raises(CheckpointError, match="CRC mismatch"):
        mgr.load(newest.name)  # an explicit path never falls back

    for p in tmp_path.glob("ckpt-*.pt"):
        p.write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint in"):
        mgr.resolve("latest")


def test_stale_temp_files_removed_at_construction(tmp_path):
    stale = [tmp_path / ".ckpt-e000-s00000001.pt.tmp.12345.deadbeef", tmp_path / ".best.pt.tmp.7.0badc0de",
             tmp_path / ".latest.json.tmp.99.00000000"]
    for p in stale:
        p.write_bytes(b"partial")
    keep = [tmp_path / "notes.txt", tmp_path / ".hidden"]
    for p in keep:
        p.write_text("x")
    CheckpointManager(tmp_path)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)


_KILL_CHILD = textwrap.dedent(
    """
    import sys, torch
    from kdscale.engine.checkpoint import CheckpointManager
    mgr = CheckpointManager(sys.argv[1], keep_last=2, mode="max")
    i = int(sys.argv[2])
    big = torch.empty(4_000_000)  # 16 MB per save
    while True:
        big.fill_(float(i))
        mgr.save({"step": i, "big": big, "check": torch.tensor(float(i))}, epoch=i // 4, step=i, metric=float(i % 3))
        print(i, flush=True)
        i += 1
    """
)


def test_sigkill_during_save_leaves_loadable_latest(tmp_path):
    ck = tmp_path / "ck"
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = random.Random(0)
    start = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(ck), str(start)], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            assert proc.stdout.readline().strip() == str(start)  # start-up done, saving in a loop
            assert proc.stdout.readline().strip() == str(start + 1)
            # the child spends nearly all its time inside save(): a random kill lands mid-save
            # (while writing the temp file, replacing, linking best.pt, writing the JSON files)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        mgr = CheckpointManager(ck, keep_last=2, mode="max")  # cleans up the killed save's temp file
        assert _tmp_files(ck) == []
        latest = mgr.latest()
        assert latest is not None
        state = load_checkpoint(latest)
        assert state["step"] >= start + 1
        assert torch.equal(state["big"], torch.full((4_000_000,), float(state["step"])))
        # no partial file is ever visible under a final name
        for p in [*ck.glob("ckpt-*.pt"), ck / "best.pt"]:
            s = load_checkpoint(p)
            assert s["check"].item() == s["step"] and s["big"][-1].item() == s["step"]
        json.loads((ck / "latest.json").read_text())
        json.loads((ck / "best.json").read_text())
        start = state["step"] + 1


# --------------------------------------------------------------------------- rng


def _draws():
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + [float(np.random.standard_normal())],
        torch.rand(3).tolist() + torch.randn(1).tolist(),
    )


def test_rng_round_trip_through_checkpoint(tmp_path):
    seed_everything(123)
    random.gauss(0, 1)  # leaves a cached gauss value in Python's generator
    np.random.standard_normal()  # and in numpy's legacy one
    rng = capture_rng_state()
    check_weights_only_safe(rng)
    expected = _draws()
    _draws()  # advance further
    restore_rng_state(rng)
    assert _draws() == expected
    loaded = load_checkpoint(save_atomic({"rng": rng}, tmp_path / "rng.pt"))["rng"]
    seed_everything(999)
    restore_rng_state(loaded)
    assert _draws() == expected


def test_seed_everything_per_rank():
    assert seed_everything(5) == 5
    a = _draws()
    assert seed_everything(5, rank=0) == 5 and _draws() == a
    assert seed_everything(5, rank=2) == 5 + 2 * 1_000_003
    b = _draws()
    assert all(x != y for x, y in zip(a, b))
    seed_everything(5, rank=2)
    assert _draws() == b
    seed_everything(2**32 - 1, rank=5)  # beyond numpy's 32-bit seed range: reduced, not an error
    with pytest.raises(ValueError):
        seed_everything(-1)
    with pytest.raises(TypeError):
        seed_everything(1.5)
