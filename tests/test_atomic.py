"""kdscale.io.atomic, the one atomic-write module: content, durability calls, failure cleanup."""
from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from kdscale.io import atomic


def test_json_round_trip_with_numpy_and_no_temp_left(tmp_path):
    path = tmp_path / "sub" / "a.json"   # the parent is created
    atomic.write_json_atomic(path, {"b": np.float32(0.5), "a": np.arange(3), "s": (1, 2)})
    assert json.loads(path.read_text()) == {"a": [0, 1, 2], "b": 0.5, "s": [1, 2]}
    assert path.read_text().endswith("}\n")
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_file_and_directory_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: events.append(("replace",)) or real_replace(a, b))
    atomic.write_text_atomic(tmp_path / "t.txt", "x")
    assert events == [("fsync", False), ("replace",), ("fsync", True)]


def test_a_failed_write_keeps_the_old_file_removes_the_temp_and_names_the_path(tmp_path):
    path = tmp_path / "index.json"
    atomic.write_json_atomic(path, {"old": 1})

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")   # write() names no file

    with pytest.raises(OSError) as info:
        atomic.write_atomic(path, full)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_interrupt_is_not_translated_and_leaves_no_temp(tmp_path):
    def interrupted(f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomic(tmp_path / "x.bin", interrupted, tmp=atomic.pid_tmp_path(tmp_path / "x.bin"))
    assert list(tmp_path.iterdir()) == []


def test_temp_name_schemes(tmp_path):
    hidden = atomic.hidden_tmp_path(tmp_path / "best.pt")
    assert hidden.parent == tmp_path and atomic.HIDDEN_TMP_RE.match(hidden.name)
    assert atomic.pid_tmp_path(tmp_path / "shard-000001.tar").name == f"shard-000001.tar.tmp-{os.getpid()}"


def test_publish_and_link_or_copy(tmp_path):
    tmp = tmp_path / "q.jsonl.part"
    tmp.write_text("line\n")
    atomic.publish_atomic(tmp, tmp_path / "q.jsonl")
    assert not tmp.exists() and (tmp_path / "q.jsonl").read_text() == "line\n"
    atomic.link_or_copy_atomic(tmp_path / "q.jsonl", tmp_path / "best.jsonl")
    atomic.write_text_atomic(tmp_path / "q.jsonl", "new\n")   # a new inode: the link keeps the old content
    assert (tmp_path / "best.jsonl").read_text() == "line\n"
