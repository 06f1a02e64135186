"""kdscale's shard formats, read by the webdataset library itself.

kdscale reads its shards with its own loader (exact epochs, resume, per-rank arithmetic), but the
files are plain WebDataset tars: any tool built on ``webdataset`` must be able to read every
member of a kdscale data shard, and every array of a packed soft-label shard, byte for byte.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from shard_fixtures import build_fixture

wds = pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_fixture(tmp_path_factory.mktemp("wds") / "run", n=24)


def _members_by_key(tar_path) -> dict[str, dict[str, bytes]]:
    """What tarfile sees: {key: {extension: bytes}}, the key being everything before the first dot."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def test_webdataset_reads_every_member_of_every_data_shard(shards):
    from kdscale.data.shard_index import read_index

    total = 0
    for split in ("train", "val", "test"):
        index = read_index(shards, split)
        for entry in index["shards"]:
            path = shards / split / entry["name"]
            expected = _members_by_key(path)
            samples = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
            assert [s["__key__"] for s in samples] == list(expected)
            assert len(samples) == entry["count"]
            for sample in samples:
                members = {k: v for k, v in sample.items() if not k.startswith("__")}
                assert members == expected[sample["__key__"]]
                meta = json.loads(members["json"])
                # every extension the metadata promises is there, and nothing else
                assert sorted(meta["members"]) == sorted(members)
                labels = np.load(io.BytesIO(members["labels.npy"]), allow_pickle=False)
                assert labels.dtype == np.float32 and labels.shape == (len(index["label_names"]),)
                if meta["present"]["ehr"]:
                    ehr = np.load(io.BytesIO(members["ehr.npy"]), allow_pickle=False)
                    assert ehr.shape[0] == meta["ehr_len"]
            total += len(samples)
    assert total == 24


def test_webdataset_decoders_give_the_same_images_as_kdscale(shards):
    """wds's own PIL decoder and kdscale's decode path agree on the stored pixels."""
    from PIL import Image

    path = next((shards / "train").glob("*.tar"))
    for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode("pil"):
        if "jpg" not in sample:
            continue
        raw = _members_by_key(path)[sample["__key__"]]["jpg"]
        ours = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        assert np.array_equal(np.asarray(sample["jpg"].convert("RGB")), ours)


def test_webdataset_reads_every_array_of_a_soft_label_shard(shards, tmp_path):
    """Packed soft-label shards hold one member per array; wds groups members by the name before
    the first dot, so each array arrives as its own wds sample (key = array name)."""
    from kdscale.data.shard_index import read_index
    from kdscale.distill.softlabels import FORMAT, MEMBERS, SoftShard, read_soft_shard, write_soft_shard

    entry = read_index(shards, "train")["shards"][0]
    keys = list(_members_by_key(shards / "train" / entry["name"]))
    n = len(keys)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n, 2, 3)).astype(np.float16)
    seen = rng.random((n, 2)) < 0.7
    path = tmp_path / entry["name"]
    write_soft_shard(path, SoftShard({"format": FORMAT, "data_shard": entry["name"]}, keys, logits, seen,
                                     logits[:, :1], seen[:, :1]))
    by_key = {s["__key__"]: s for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)}
    assert sorted(f"{k}.{next(e for e in s if not e.startswith('__'))}" for k, s in by_key.items()) == sorted(MEMBERS)
    assert json.loads(by_key["keys"]["json"]) == keys
    assert np.array_equal(np.load(io.BytesIO(by_key["logits"]["npy"]), allow_pickle=False), logits)
    assert np.array_equal(np.load(io.BytesIO(by_key["seen"]["npy"]), allow_pickle=False), seen)
    ours = read_soft_shard(path)
    assert ours.keys == keys and np.array_equal(ours.logits, logits)
