"""Shard loader: batch contents, equal batches per rank, exact eval coverage, resume, soft-label
join, corrupt/truncated/unsafe members."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from shard_fixtures import build_fixture, loader_cfg

from kdscale.data.ingest import DataError
from kdscale.data.loader import EpochPlan, SoftLabelError, build_loader
from kdscale.data.shard_index import read_index
from kdscale.data.tario import TarShardWriter, UnsafeMemberError, split_member_name


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 30 samples, 4 per shard: train 18 samples in 5 uneven shards (4, 4, 4, 4, 2).
    return build_fixture(tmp_path_factory.mktemp("read"), n=30)


def _rewrite(path, fn) -> None:
    """Rewrite a tar through ``fn([(name, data)]) -> [(name, data)]``."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    writer = TarShardWriter(path)
    for name, data in fn(members):
        writer.add(name, data)
    writer.commit()


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_batch_contents(shards):
    loader = build_loader(shards, "train", loader_cfg(batch_size=4), train=True, rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 18 // 4
    for batch in batches:
        assert batch["image"].shape == (4, 3, 16, 16) and batch["labels"].shape == (4, 3)
        assert set(batch["present"]) == {"image", "ehr", "report", "tabular"}
        for i, meta in enumerate(batch["meta"]):
            assert batch["ehr_len"][i] == (meta["ehr_len"] if meta["present"]["ehr"] else 0)
            assert not batch["ehr"][i, batch["ehr_len"][i]:].any()          # zero padding
            assert batch["present"]["image"][i] == meta["present"]["image"]
            if not meta["present"]["image"]:
                assert not batch["image"][i].any()
            assert (batch["report"][i] is None) == (not meta["present"]["report"])
        assert batch["ehr"].shape[1] == max(1, int(batch["ehr_len"].max()))
        assert batch["valid"].all()
    nan_labels = torch.cat([b["labels"] for b in batches]).isnan().sum()
    assert nan_labels > 0          # unknown labels stay NaN, never silently 0


def test_default_transform_is_224(shards):
    cfg = loader_cfg(image_size=224, resize_size=256, modalities=["image"])
    batch = next(iter(build_loader(shards, "val", cfg, train=False, rank=0, world_size=1)))
    assert batch["image"].shape[1:] == (3, 224, 224) and "ehr" not in batch
    assert not batch["present"]["ehr"].any()     # not loaded = absent to the model


@pytest.mark.parametrize("world,workers,train", [(2, 0, True), (3, 2, True), (2, 2, False), (4, 2, False)])
def test_equal_batches_per_rank_and_exact_eval(shards, world, workers, train):
    cfg = loader_cfg(num_workers=workers, drop_last=False)
    per_rank, valid = [], Counter()
    for rank in range(world):
        loader = build_loader(shards, "train", cfg, train=train, rank=rank, world_size=world)
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append(len(batches))
        valid.update(k for b in batches for k, v in zip(b["key"], b["valid"]) if v)
    assert len(set(per_rank)) == 1, per_rank
    if not train:  # every sample valid exactly once across ranks
        assert sum(valid.values()) == read_index(shards, "train")["num_samples"]
        assert set(valid.values()) == {1}


def test_shard_order_is_seeded_by_epoch(shards):
    cfg = loader_cfg(shuffle_buffer=0)
    a = build_loader(shards, "train", cfg, train=True, rank=0, world_size=1)
    first, again = _keys(a), _keys(a)
    a.set_epoch(1)
    assert first == again and _keys(a) != first


def test_resume_mid_epoch_is_exact(shards):
    cfg = loader_cfg(num_workers=2)
    full = build_loader(shards, "train", cfg, train=True, rank=0, world_size=1, epoch=3)
    reference = list(full)
    partial = build_loader(shards, "train", cfg, train=True, rank=0, world_size=1, epoch=3)
    iterator = iter(partial)
    for _ in range(2):
        next(iterator)
    state = partial.state_dict()
    assert state["epoch"] == 3 and state["batch"] == 2
    resumed = build_loader(shards, "train", cfg, train=True, rank=0, world_size=1)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b["key"] for b in rest] == [b["key"] for b in reference[2:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, reference[2:]))
    with pytest.raises(ValueError, match="geometry"):
        build_loader(shards, "train", loader_cfg(num_workers=1), train=True, rank=0,
                     world_size=1).load_state_dict(state)


def _soft_set(shards, tmp_path, edit=lambda split, name, keys: keys):
    soft = tmp_path / "soft"
    for split in ("train", "val", "test"):
        (soft / split).mkdir(parents=True)
        for entry in read_index(shards, split)["shards"]:
            with tarfile.open(shards / split / entry["name"]) as tar:
                keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
            writer = TarShardWriter(soft / split / entry["name"])
            for key in edit(split, entry["name"], keys):
                buf = io.BytesIO()
                np.save(buf, np.full(3, float(len(key)), np.float16), allow_pickle=False)
                writer.add(f"{key}.soft.npy", buf.getvalue())
                writer.add(f"{key}.teachers.json", json.dumps({"t": 1.0}).encode())
            writer.commit()
    return soft


def test_soft_label_join(shards, tmp_path):
    soft = _soft_set(shards, tmp_path)
    batch = next(iter(build_loader(shards, "val", loader_cfg(), train=False, rank=0, world_size=1, soft_dir=soft)))
    assert batch["soft"]["soft"].shape == (2, 3)
    assert batch["soft"]["soft"][0, 0] == len(batch["key"][0])    # aligned with its own sample
    assert batch["soft"]["teachers"] == [{"t": 1.0}] * 2


def test_soft_label_missing_or_misordered_key_is_an_error(shards, tmp_path):
    missing = _soft_set(shards, tmp_path / "a", lambda s, n, keys: keys[:-1] if n.endswith("00.tar") else keys)
    with pytest.raises(SoftLabelError, match=r"shard-000000.tar: missing key p\d+_s\d+"):
        list(build_loader(shards, "val", loader_cfg(), train=False, rank=0, world_size=1, soft_dir=missing))
    swapped = _soft_set(shards, tmp_path / "b", lambda s, n, keys: [keys[1], keys[0], *keys[2:]])
    with pytest.raises(SoftLabelError, match="same keys in the same order"):
        list(build_loader(shards, "val", loader_cfg(), train=False, rank=0, world_size=1, soft_dir=swapped))
    with pytest.raises(SoftLabelError, match="missing for split 'val'"):
        build_loader(shards, "val", loader_cfg(), train=False, rank=0, world_size=1, soft_dir=tmp_path / "none")


def test_corrupt_truncated_and_unsafe_members_are_skipped_and_counted(shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    victim = {}

    def garble(members):   # one image garbled, one member renamed with a path component
        out = []
        for name, data in members:
            if name.endswith((".jpg", ".png")) and "image" not in victim:
                victim["image"], data = name, b"\xff\xd8\xff not a jpeg"
            elif name.endswith(".txt") and "unsafe" not in victim and "image" in victim \
                    and not name.startswith(victim["image"].split(".")[0] + "."):
                victim["unsafe"], name = name, "evil/" + name
            out.append((name, data))
        return out

    _rewrite(broken / "train" / "shard-000000.tar", garble)
    truncated = broken / "train" / "shard-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:2000])
    cfg = loader_cfg(num_workers=2, drop_last=False)
    loader = build_loader(broken, "train", cfg, train=True, rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader)                     # no hang, no lost batch
    assert loader.skipped["corrupt sample"] >= 1
    assert loader.skipped["truncated shard"] >= 1
    assert loader.skipped["unsafe member name"] >= 1
    assert loader.skipped["incomplete sample"] >= 1       # the sample that lost its report
    seen = {k for b in batches for k in b["key"]}
    assert victim["image"].split(".")[0] not in seen


def test_all_shards_unreadable_is_an_error_not_a_hang(shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    for tar in (broken / "val").glob("*.tar"):
        tar.write_bytes(b"")
    with pytest.raises(DataError, match="no readable sample"):
        list(build_loader(broken, "val", loader_cfg(), train=False, rank=0, world_size=1))


def test_member_names_with_paths_are_rejected():
    assert split_member_name("p1_s2.ehr.npy") == ("p1_s2", "ehr.npy")
    for bad in ("a/p1.json", "../p1.json", "p1.pickle", "p1.pyd", ".hidden.json"):
        with pytest.raises(UnsafeMemberError):
            split_member_name(bad)


def test_too_small_split_is_refused_clearly():
    with pytest.raises(DataError, match=r"18 samples, fewer than batch_size 4 x world_size 2 x workers 3"):
        EpochPlan.make(18, 2, 3, 4, train=True, drop_last=True)
    assert EpochPlan.make(18, 2, 3, 4, train=True, drop_last=False).batches_per_slot == 1
