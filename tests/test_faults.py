"""Faults and hostile files (issue 13): a flipped byte in the newest checkpoint resumes from the
previous one to the weights of an uninterrupted run; a full disk ends in one line naming the
path and leaves the last checkpoint loadable; a crafted pickle is refused naming the global; the
loader refuses shards that no longer match index.json (count, size, sha256)."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from shard_fixtures import FEATURES, LABELS, build_fixture, loader_cfg

from kdscale.config import validate
from kdscale.data.ingest import DataError
from kdscale.data.loader import build_loader
from kdscale.engine.checkpoint import CheckpointError, CheckpointManager, UnsafeCheckpointError, load_checkpoint
from kdscale.io import atomic as atomic_mod   # every atomic write (checkpoints included) opens files here


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 30 samples, 4 per shard: train 18 samples in 5 shards (4, 4, 4, 4, 2)
    return build_fixture(tmp_path_factory.mktemp("faults"), n=30)


# ---------------------------------------------------------------------------------------------
# Resume past a corrupt newest checkpoint
# ---------------------------------------------------------------------------------------------

class _PreemptAt:
    """Wrap a task: request a save (as SIGUSR1 would) at the given training call; the engine
    saves at that step boundary and raises Preempted."""

    def __init__(self, task, trainer_ref: list, at: int):
        self.task, self.trainer_ref, self.at, self.calls = task, trainer_ref, at, 0
        self.main_head = task.main_head

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            self.trainer_ref[0].save_request.requested = True
        return self.task.loss(model, batch)

    def predict(self, model, batch):
        return self.task.predict(model, batch)


def _fit(shards, out: Path, resume=None, preempt_at: int = 0):
    from kdscale.distill.student_training import StudentRunConfig, build_task
    from kdscale.engine.config import TrainConfig
    from kdscale.engine.rng import seed_everything
    from kdscale.engine.trainer import Trainer
    from kdscale.models.students import build_student

    student = validate(StudentRunConfig, {"name": "ehr", "method": "supervised",
                                          "model": {"kind": "unimodal", "modality": "ehr", "ehr_arch": "lstm_small"}})
    seed_everything(0, 0)
    model = build_student(student.model, len(LABELS), ehr_features=len(FEATURES))
    task = build_task(student, [], "multilabel")
    ref: list = [None]
    if preempt_at:
        task = _PreemptAt(task, ref, preempt_at)
    loader = build_loader(shards, "train", loader_cfg(batch_size=4, modalities=["ehr"], require=["ehr"]),
                          train=True, rank=0, world_size=1)
    tcfg = validate(TrainConfig, {"epochs": 2, "progress": False, "device": "cpu", "checkpoint_every_steps": 1,
                                  "keep_last": 10, "log_every_steps": 1})
    trainer = Trainer(tcfg, out, model, task, loader, None, label_names=LABELS)
    ref[0] = trainer
    return trainer.fit(resume=resume)


def test_flipped_byte_in_newest_checkpoint_resumes_from_the_previous_one(shards, tmp_path, caplog):
    from kdscale.engine.signals import Preempted
    from test_checkpoint import _flip_byte_in_member

    _fit(shards, tmp_path / "clean")
    clean = load_checkpoint(CheckpointManager(tmp_path / "clean" / "checkpoints").resolve("latest"))["model"]

    with pytest.raises(Preempted):
        _fit(shards, tmp_path / "hit", preempt_at=5)            # 3 steps per epoch: mid-epoch 1
    manager = CheckpointManager(tmp_path / "hit" / "checkpoints")
    *_, previous, newest = manager.step_checkpoints()
    assert manager.latest() == newest and newest.name == "ckpt-e001-s00000005.pt"
    _flip_byte_in_member(newest, "data/0")          # bit rot inside a tensor: only the CRC sees it
    with pytest.raises(CheckpointError, match="CRC mismatch"):
        load_checkpoint(newest)
    with caplog.at_level("WARNING"):
        _fit(shards, tmp_path / "hit", resume="latest")
    assert newest.name in caplog.text and f"resuming from {previous.name}" in caplog.text
    events = [json.loads(x) for x in (tmp_path / "hit" / "metrics.jsonl").read_text().splitlines()]
    resume = [e for e in events if e.get("event") == "resume"]
    assert resume[-1]["step"] == 4 and resume[-1]["checkpoint"].endswith(previous.name)
    resumed = load_checkpoint(manager.resolve("latest"))["model"]
    assert clean.keys() == resumed.keys()
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key


def test_explicit_checkpoint_path_never_falls_back(tmp_path):
    from test_checkpoint import _flip_byte_in_member

    manager = CheckpointManager(tmp_path, keep_last=None)
    manager.save({"v": torch.arange(100.0)}, epoch=0, step=1)
    bad = manager.save({"v": torch.arange(100.0) + 1}, epoch=0, step=2)
    _flip_byte_in_member(bad, "data/0")
    state, path = manager.load("latest")
    assert path.name == "ckpt-e000-s00000001.pt" and state["v"][0] == 0
    with pytest.raises(CheckpointError, match="CRC mismatch"):
        manager.load(str(bad))
    _flip_byte_in_member(manager.dir / "ckpt-e000-s00000001.pt", "data/0")
    with pytest.raises(CheckpointError, match="no loadable checkpoint .* tried 2"):
        manager.load("latest")


# ---------------------------------------------------------------------------------------------
# Disk full / unwritable
# ---------------------------------------------------------------------------------------------

class _FullDisk(io.RawIOBase):
    """A file that accepts ``room`` bytes, then fails every write with ENOSPC (as a full disk)."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def flush(self):
        if not self.fh.closed:
            self.fh.flush()

    def fileno(self):
        return self.fh.fileno()

    def close(self):
        if not self.closed:
            self.fh.close()
            super().close()


@pytest.mark.parametrize("room", [10, 3000])   # fails at torch's first write / inside its zip writer
def test_disk_full_during_save_names_the_path_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, room):
    manager = CheckpointManager(tmp_path / "ck", keep_last=2)
    manager.save({"w": torch.ones(10)}, epoch=0, step=1)
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return _FullDisk(fh, room) if "x" in mode else fh

    monkeypatch.setattr(atomic_mod, "open", full_open, raising=False)
    with pytest.raises(OSError) as info:
        manager.save({"w": torch.zeros(4000)}, epoch=0, step=2)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "ck" / "ckpt-e000-s00000002.pt")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["ckpt-e000-s00000001.pt", "latest.json"]
    state, path = CheckpointManager(tmp_path / "ck").load("latest")
    assert path.name == "ckpt-e000-s00000001.pt" and torch.equal(state["w"], torch.ones(10))


def test_cli_reports_an_os_error_in_one_line(tmp_path, capsys):
    from kdscale import cli

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["demo-data", "--flavor", "mimic", "--n", "10", "--out", str(blocker / "demo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdscale demo-data: error: ") and str(blocker) in err[0]
    assert "[ENOTDIR]" in err[0] or "[EEXIST]" in err[0]


# ---------------------------------------------------------------------------------------------
# Crafted checkpoint
# ---------------------------------------------------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo crafted",))


def test_crafted_checkpoint_is_refused_naming_the_global(tmp_path, capsys):
    path = tmp_path / "teacher.pt"
    torch.save({"model": {}, "x": _Evil()}, path)   # torch.save pickles anything: a crafted file
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "posix.system" in message and str(path) in message and "truncated" not in message
    assert len(message.splitlines()) == 1
    assert "crafted" not in capsys.readouterr().out       # nothing was executed


# ---------------------------------------------------------------------------------------------
# The loader against index.json
# ---------------------------------------------------------------------------------------------

def _copy(shards, tmp_path) -> Path:
    dst = tmp_path / "shards"
    shutil.copytree(shards, dst)
    return dst


def _edit_index(root: Path, split: str, fn) -> None:
    path = root / split / "index.json"
    index = json.loads(path.read_text())
    fn(index)
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("train", [True, False])
def test_overstated_count_is_an_error_not_silent_duplicates(shards, tmp_path, train):
    root = _copy(shards, tmp_path)

    def overstate(index):
        index["shards"][1]["count"] += 1
        index["num_samples"] += 1
    _edit_index(root, "train", overstate)
    loader = build_loader(root, "train", loader_cfg(batch_size=2, drop_last=False), train=train, rank=0, world_size=1)
    with pytest.raises(DataError, match="shard-000001.tar holds 4 samples, its index.json says 5"):
        list(loader)


def test_understated_count_is_an_error(shards, tmp_path):
    root = _copy(shards, tmp_path)

    def understate(index):
        index["shards"][0]["count"] -= 1
        index["num_samples"] -= 1
    _edit_index(root, "train", understate)
    loader = build_loader(root, "train", loader_cfg(batch_size=2, drop_last=False), train=False, rank=0, world_size=1)
    with pytest.raises(DataError, match="shard-000000.tar holds more samples than its index.json lists"):
        list(loader)


def _flip_member_byte(tar_path: Path) -> None:
    """Change one byte of a member's data in place (same size; tar headers stay valid)."""
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
    data = bytearray(tar_path.read_bytes())
    data[member.offset_data + 2] ^= 0x01
    tar_path.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_modified_shard_bytes_are_an_error_naming_the_shard(shards, tmp_path, workers):
    root = _copy(shards, tmp_path)
    victim = root / "train" / "shard-000002.tar"
    size = victim.stat().st_size
    _flip_member_byte(victim)
    assert victim.stat().st_size == size
    loader = build_loader(root, "train", loader_cfg(batch_size=2, num_workers=workers, drop_last=False), train=True,
                          rank=0, world_size=1)
    with pytest.raises(DataError, match="shard-000002.tar: sha256 does not match index.json"):
        list(loader)


def test_grown_or_missing_shard_is_refused_before_any_batch(shards, tmp_path):
    root = _copy(shards, tmp_path)
    victim = root / "train" / "shard-000003.tar"
    victim.write_bytes(victim.read_bytes() + bytes(512 * 20))     # an extra (zero) member's worth
    with pytest.raises(DataError, match="shard-000003.tar is .* bytes, its index.json says"):
        build_loader(root, "train", loader_cfg(), train=True, rank=0, world_size=1)
    victim.unlink()
    with pytest.raises(DataError, match="shard-000003.tar of split 'train' is missing"):
        build_loader(root, "train", loader_cfg(), train=True, rank=0, world_size=1)


def test_intact_shards_are_hashed_once_per_process(shards, tmp_path):
    from kdscale.data import loader as loader_mod

    root = _copy(shards, tmp_path)
    loader = build_loader(root, "train", loader_cfg(batch_size=2, drop_last=False), train=True, rank=0, world_size=1)
    list(loader)
    verified = {Path(p).name for p, _ in loader_mod._VERIFIED_SHARDS if Path(p).parent.parent == root}
    assert verified == {p.name for p in (root / "train").glob("*.tar")}
    _flip_member_byte(root / "train" / "shard-000000.tar")   # after the check: not read whole again
    loader.set_epoch(1)
    assert len(list(loader)) == len(loader)                     # no second hash of a checked shard


def test_disk_full_while_writing_a_shard_names_it_and_leaves_no_temp(tmp_path, monkeypatch):
    from kdscale.data import tario

    real_open = open
    monkeypatch.setattr(tario, "open", lambda path, mode="r", *a, **kw: _FullDisk(real_open(path, mode, *a, **kw), 2000)
                        if "w" in mode else real_open(path, mode, *a, **kw), raising=False)
    writer = tario.TarShardWriter(tmp_path / "shard-000000.tar")
    with pytest.raises(OSError) as info:
        writer.add("k1.json", b"x" * 5000)
        writer.commit()
    writer.abort()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "shard-000000.tar")
    assert list(tmp_path.iterdir()) == []


def test_kdscale_train_on_a_full_disk_ends_in_one_line_and_keeps_the_last_checkpoint(shards, tmp_path, monkeypatch,
                                                                                       capsys):
    from kdscale import cli
    from kdscale.config import dump
    from kdscale.schema import Config

    cfg = validate(Config, {
        "run": {"out_dir": str(tmp_path / "run"), "seed": 0}, "shards": {"out_dir": str(shards)},
        "loader": {"num_workers": 0, "batch_size": 4, "image_size": 16, "resize_size": 18},
        "students": [{"name": "ehr", "method": "supervised",
                      "model": {"kind": "unimodal", "modality": "ehr", "ehr_arch": "lstm_small"},
                      "train": {"epochs": 3, "progress": False, "device": "cpu"}}]})
    dump(cfg, tmp_path / "cfg.yaml")
    real_open = open

    def disk_full_from_epoch_2(path, mode="r", *args, **kwargs):   # the disk fills up after epoch 1's save
        fh = real_open(path, mode, *args, **kwargs)
        return _FullDisk(fh, 100) if "x" in mode and "ckpt-e002" in str(path) else fh

    monkeypatch.setattr(atomic_mod, "open", disk_full_from_epoch_2, raising=False)
    assert cli.main(["train", "--cfg", str(tmp_path / "cfg.yaml")]) == 2
    monkeypatch.undo()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    folder = tmp_path / "run" / "students" / "ehr" / "checkpoints"
    assert last == (f"kdscale train: error: {folder / 'ckpt-e002-s00000006.pt'}: No space left on device [ENOSPC]")
    assert not [p.name for p in folder.iterdir() if ".tmp." in p.name]
    state, path = CheckpointManager(folder).load("latest")
    assert path.name == "ckpt-e001-s00000003.pt" and state["epoch"] == 1


def test_disk_full_while_logging_metrics_names_the_log(tmp_path):
    """metrics.jsonl and TensorBoard writes that hit a full disk say which run's log failed."""
    from kdscale.cli import describe_os_error
    from kdscale.engine.logger import MetricsLogger

    logger = MetricsLogger(tmp_path / "run")
    logger.step({"step": 1, "epoch": 0, "loss": 0.5})
    real = logger._jsonl

    class _FullFile:                      # line-buffered text: the write reaches the disk at once
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    logger._jsonl = _FullFile()
    with pytest.raises(OSError) as info:
        logger.epoch({"step": 2, "epoch": 0, "auroc_macro": 0.6})
    assert info.value.errno == errno.ENOSPC
    assert describe_os_error(info.value) == f"{tmp_path / 'run' / 'metrics.jsonl'}: No space left on device [ENOSPC]"
    logger._jsonl = real

    class _FullTensorBoard:
        def add_scalar(self, *args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    logger._tb = _FullTensorBoard()
    with pytest.raises(OSError) as info:
        logger.step({"step": 3, "epoch": 1, "loss": 0.4})
    assert info.value.filename == str(tmp_path / "run" / "tb")
    logger._tb = None
    logger.close()
    assert [json.loads(line)["kind"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] \
        == ["step", "step"]
