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
    from kdscale.data.softlabel_format import FORMAT, MEMBERS, SoftShard, read_soft_shard, write_soft_shard

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


# ---------------------------------------------------------------------------------------------
# The other way: a corpus written by wds.ShardWriter, brought in through data.source: webdataset
# ---------------------------------------------------------------------------------------------

LABELS3 = ["benign", "malignant", "normal"]


def _write_corpus(root, n_per_split=8):
    """A user's existing WebDataset corpus: jpg + cls + json(patient) + txt, some samples bad."""
    from shard_fixtures import jpeg

    root.mkdir(parents=True)
    bad = {}
    for split in ("train", "val", "test"):
        with wds.ShardWriter(str(root / f"{split}-%06d.tar"), maxcount=5, verbose=0) as sink:
            for i in range(n_per_split):
                key = f"{split}/img{i:03d}"
                sample = {"__key__": key, "jpg": jpeg(20, 16, seed=i), "cls": str(i % 3),
                          "json": {"patient_id": f"{split}-p{i // 2}", "site": "A"}, "txt": f"note {i}"}
                if split == "train" and i == 5:
                    sample["cls"], bad[key] = "7", "class index out of range"
                if split == "train" and i == 6:
                    sample["jpg"], bad[key] = sample["jpg"][:40], "corrupt or truncated image"
                sink.write(sample)
    return bad


def _wds_config(tmp_path, root, **extra):
    import yaml

    from kdscale.schema import load_config

    section = {"root": str(root), "splits": {"train": "train-{000000..000001}.tar", "val": "val-*.tar",
                                             "test": "test-000000.tar"},
               "label_names": LABELS3, "patient_key": "patient_id", "report_ext": "txt", **extra}
    cfg_file = tmp_path / "wds.yaml"
    cfg_file.write_text(yaml.safe_dump({"run": {"out_dir": str(tmp_path / "run")},
                                        "data": {"source": "webdataset", "webdataset": section}}))
    return load_config(cfg_file)


def test_kdscale_reads_a_corpus_written_by_wds_shardwriter(tmp_path):
    from kdscale.data.loader import build_loader
    from kdscale.data.shard_index import read_index, verify_shards
    from kdscale.data.shards import build_shards
    from shard_fixtures import loader_cfg

    corpus = tmp_path / "corpus"
    bad = _write_corpus(corpus)
    cfg = _wds_config(tmp_path, corpus)
    summary = build_shards(cfg)
    assert summary["complete"]
    out = tmp_path / "run" / "shards"
    assert verify_shards(out) == []
    train = read_index(out, "train")
    # 8 read, 2 quarantined with their reasons; test: only the first shard (5 samples) was named
    assert train["num_samples"] == 6 and read_index(out, "val")["num_samples"] == 8
    assert read_index(out, "test")["num_samples"] == 5
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["reason"] for q in quarantine) == sorted(bad.values())
    assert train["label_names"] == LABELS3 and train["presence"]["image"] == 6 and train["presence"]["report"] == 6
    batch = next(iter(build_loader(out, "val", loader_cfg(), train=False, rank=0, world_size=1)))
    assert batch["labels"].shape == (2, 3)
    # one-hot of the class index, in the corpus's order (val img000 -> class 0, img001 -> class 1)
    assert batch["labels"][0].tolist() == [1.0, 0.0, 0.0] and batch["labels"][1].tolist() == [0.0, 1.0, 0.0]


def test_webdataset_source_json_labels_and_bad_config(tmp_path):
    from kdscale.config import ConfigError
    from kdscale.data.ingest import DataError, IngestLog
    from kdscale.data.sources import build_source

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with wds.ShardWriter(str(corpus / "train-%06d.tar"), maxcount=10, verbose=0) as sink:
        sink.write({"__key__": "a", "json": {"labels": {"benign": 1, "malignant": None}}, "txt": "x"})
        sink.write({"__key__": "b", "json": {"labels": [0, 1, 0]}, "txt": "y"})
        sink.write({"__key__": "c", "json": {"labels": [0, "1", 0]}, "txt": "z"})
    cfg = _wds_config(tmp_path, corpus, labels_from="json", patient_key="",
                      splits={"train": "train-000000.tar"})
    source = build_source(cfg.data)
    log = IngestLog("wds")
    records = list(source.records(log))
    assert [r.key for r in records] == ["a", "b"]
    assert records[0].labels[0] == 1 and np.isnan(records[0].labels[1:]).all()
    assert records[1].labels.tolist() == [0, 1, 0] and records[1].image is None
    assert log.summary()["skipped"] == 1
    with pytest.raises(DataError, match="shard file not found"):
        build_source(_wds_config(tmp_path, corpus, splits={"train": "nope-{0..3}.tar"}).data)
    with pytest.raises(DataError, match="matches no file"):
        build_source(_wds_config(tmp_path, corpus, splits={"train": "nope-*.tar"}).data)
    outside = tmp_path / "elsewhere.tar"
    outside.write_bytes((corpus / "train-000000.tar").read_bytes())
    with pytest.raises(DataError, match="leaves the corpus root"):
        build_source(_wds_config(tmp_path, corpus, splits={"train": "../elsewhere.tar"}).data)
    with pytest.raises(ConfigError, match="unknown split"):
        _wds_config(tmp_path, corpus, splits={"training": "train-000000.tar"})
