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


def _rebless(shard_dir, split: str) -> None:
    """Record the shards' current size and sha256 in index.json: the loader refuses shards changed
    after the build, so a test of what it does with bad CONTENT must make the index agree."""
    from kdscale.data.tario import sha256_file

    path = shard_dir / split / "index.json"
    index = json.loads(path.read_text())
    for entry in index["shards"]:
        tar = shard_dir / split / entry["name"]
        entry["bytes"], entry["sha256"] = tar.stat().st_size, sha256_file(tar)
    path.write_text(json.dumps(index))


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
    """Packed soft-label shards (kdscale.data.softlabel_format) whose values encode the key length."""
    from kdscale.data.softlabel_format import FORMAT, SoftShard, write_soft_shard

    soft = tmp_path / "soft"
    for split in ("train", "val", "test"):
        (soft / split).mkdir(parents=True)
        for entry in read_index(shards, split)["shards"]:
            with tarfile.open(shards / split / entry["name"]) as tar:
                keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
            keys = edit(split, entry["name"], keys)
            n = len(keys)
            logits = np.array([[[len(k)] * 3] * 2 for k in keys], np.float16).reshape(n, 2, 3)
            write_soft_shard(soft / split / entry["name"], SoftShard(
                {"format": FORMAT}, keys, logits, np.ones((n, 2), bool), logits[:, :1], np.ones((n, 1), bool)))
    return soft


def test_soft_label_join(shards, tmp_path):
    soft = _soft_set(shards, tmp_path)
    batch = next(iter(build_loader(shards, "val", loader_cfg(), train=False, rank=0, world_size=1, soft_dir=soft)))
    assert batch["soft"]["logits"].shape == (2, 2, 3)
    assert batch["soft"]["logits"][0, 0, 0] == len(batch["key"][0])    # aligned with its own sample
    assert batch["soft"]["ensemble"].shape == (2, 1, 3) and batch["soft"]["seen"].dtype == torch.bool


def test_soft_label_missing_or_misordered_key_is_an_error(shards, tmp_path):
    missing = _soft_set(shards, tmp_path / "a", lambda s, n, keys: keys[:-1] if n.endswith("00.tar") else keys)
    with pytest.raises(SoftLabelError, match=r"shard-000000.tar: missing key p\d+_s\d+"):
        list(build_loader(shards, "val", loader_cfg(), train=False, rank=0, world_size=1, soft_dir=missing))
    swapped = _soft_set(shards, tmp_path / "b", lambda s, n, keys: [keys[1], keys[0], *keys[2:]])
    with pytest.raises(SoftLabelError, match="same keys in the same order"):
        list(build_loader(shards, "val", loader_cfg(), train=False, rank=0, world_size=1, soft_dir=swapped))
    with pytest.raises(SoftLabelError, match="missing for split 'val'"):
        build_loader(shards, "val", loader_cfg(), train=False, rank=0, world_size=1, soft_dir=tmp_path / "none")
    truncated = _soft_set(shards, tmp_path / "c")
    victim = truncated / "val" / "shard-000000.tar"
    victim.write_bytes(victim.read_bytes()[:700])
    with pytest.raises(DataError, match="shard-000000.tar"):
        list(build_loader(shards, "val", loader_cfg(), train=False, rank=0, world_size=1, soft_dir=truncated))


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
    _rebless(broken, "train")
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
    _rebless(broken, "val")
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


# ---------------------------------------------------------------------------------------------
# loader.require: only samples that have given modalities (unimodal teachers)
# ---------------------------------------------------------------------------------------------

def _present_keys(shards, split: str, require) -> set:
    """Ground truth from the samples' own metadata."""
    from kdscale.data.tario import iter_samples

    keys = set()
    for entry in read_index(shards, split)["shards"]:
        for sample in iter_samples(shards / split / entry["name"]):
            present = json.loads(sample["json"])["present"]
            if all(present[m] for m in require):
                keys.add(sample["__key__"])
    return keys


@pytest.mark.parametrize("require", [["image"], ["image", "ehr"]])
def test_require_eval_yields_each_qualifying_sample_once_across_ranks_and_workers(shards, require):
    expected = _present_keys(shards, "train", require)
    assert 0 < len(expected) < read_index(shards, "train")["num_samples"]     # mixed presence
    cfg = loader_cfg(num_workers=2, require=require)
    valid, per_rank = Counter(), []
    for rank in range(2):
        loader = build_loader(shards, "train", cfg, train=False, rank=rank, world_size=2)
        assert loader.num_samples == len(expected)
        batches = list(loader)
        per_rank.append(len(batches))
        for b in batches:
            assert all(b["present"][m].all() for m in require)   # padding too: it repeats real samples
            valid.update(k for k, v in zip(b["key"], b["valid"]) if v)
    assert per_rank[0] == per_rank[1] == len(loader)
    assert set(valid) == expected and set(valid.values()) == {1}


@pytest.mark.parametrize("drop_last", [True, False])
def test_require_train_equal_batches_per_rank(shards, drop_last):
    expected = _present_keys(shards, "train", ["image"])
    cfg = loader_cfg(num_workers=2, require=["image"], drop_last=drop_last, batch_size=1)
    per_rank, seen = [], Counter()
    for rank in range(2):
        loader = build_loader(shards, "train", cfg, train=True, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append(len(batches))
        for b in batches:
            assert b["present"]["image"].all()
            seen.update(b["key"])
    assert len(set(per_rank)) == 1
    assert set(seen) <= expected
    # 4 slots x batch 1: drop_last leaves out len % 4 samples of G_e, else the first ones repeat
    if drop_last:
        assert sum(seen.values()) == len(expected) // 4 * 4 and max(seen.values()) == 1
    else:
        assert set(seen) == expected and sum(seen.values()) == -(-len(expected) // 4) * 4


def test_require_resume_is_exact(shards):
    cfg = loader_cfg(num_workers=2, require=["image"])
    reference = list(build_loader(shards, "train", cfg, train=True, rank=0, world_size=1, epoch=2))
    partial = build_loader(shards, "train", cfg, train=True, rank=0, world_size=1, epoch=2)
    iterator = iter(partial)
    next(iterator)
    state = partial.state_dict()
    assert state["require"] == ["image"]
    resumed = build_loader(shards, "train", cfg, train=True, rank=0, world_size=1)
    resumed.load_state_dict(state)
    assert [b["key"] for b in resumed] == [b["key"] for b in reference[1:]]
    with pytest.raises(ValueError, match="geometry"):   # the same loader without require: another order
        build_loader(shards, "train", loader_cfg(num_workers=2), train=True, rank=0,
                     world_size=1).load_state_dict(state)


def test_require_with_no_qualifying_sample_is_a_clear_error(tmp_path):
    no_ehr = build_fixture(tmp_path, n=12, ehr=False)
    with pytest.raises(DataError, match=r"none of its \d+ samples has ehr \(loader.require=\['ehr'\]"):
        build_loader(no_ehr, "train", loader_cfg(require=["ehr"]), train=True, rank=0, world_size=1)


def test_require_needs_per_shard_presence_in_the_index(shards, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(shards, old)
    index = read_index(old, "train")
    for entry in index["shards"]:
        entry.pop("presence"), entry.pop("presence_patterns")
    (old / "train" / "index.json").write_text(json.dumps(index))
    build_loader(old, "train", loader_cfg(), train=True, rank=0, world_size=1)   # without require: fine
    with pytest.raises(DataError, match="no per-shard presence counts.*rebuild the shards"):
        build_loader(old, "train", loader_cfg(require=["image"]), train=True, rank=0, world_size=1)


def test_require_is_validated():
    with pytest.raises(ValueError, match=r"loader.require: unknown \['xray'\]"):
        loader_cfg(require=["xray"])
    with pytest.raises(ValueError, match="not in loader.modalities"):
        loader_cfg(require=["ehr"], modalities=["image"])


def test_require_still_checks_soft_label_alignment_of_filtered_out_samples(shards, tmp_path):
    without_image = set(_present_keys(shards, "val", [])) - _present_keys(shards, "val", ["image"])
    assert without_image
    soft = _soft_set(shards, tmp_path, lambda s, n, keys: [k for k in keys if k not in without_image])
    with pytest.raises(SoftLabelError, match="val/shard-"):
        list(build_loader(shards, "val", loader_cfg(require=["image"]), train=False, rank=0, world_size=1,
                          soft_dir=soft))


# ---------------------------------------------------------------------------------------------
# Speed work: persistent workers with reused batch buffers, image path, npy and tar parsing
# ---------------------------------------------------------------------------------------------

def _snapshot(batch) -> dict:
    return {"key": list(batch["key"]), "image": batch["image"].clone(), "ehr": batch["ehr"].clone()}


def _same(a: dict, b: dict) -> bool:
    return a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["ehr"], b["ehr"])


@pytest.mark.parametrize("persistent", [True, False])
def test_workers_match_in_process_reading_and_never_overwrite_held_batches(shards, persistent):
    # 1 worker and 0 workers have the same single reader slot: identical batches every epoch.
    inproc = build_loader(shards, "train", loader_cfg(batch_size=3), train=True, rank=0, world_size=1)
    worker = build_loader(shards, "train", loader_cfg(batch_size=3, num_workers=1, persistent_workers=persistent),
                          train=True, rank=0, world_size=1)
    held = list(worker)                                  # epoch 0: every batch kept
    copies = [_snapshot(b) for b in held]
    for epoch in range(3):
        inproc.set_epoch(epoch)
        worker.set_epoch(epoch)
        expected = [_snapshot(b) for b in inproc]
        got = [_snapshot(b) for b in worker]             # batches dropped: buffers are reused
        assert len(got) == len(expected) and all(_same(a, b) for a, b in zip(got, expected)), epoch
    assert all(_same(_snapshot(b), c) for b, c in zip(held, copies))   # kept batches untouched


def test_persistent_workers_after_a_cut_short_iteration(shards):
    cfg = loader_cfg(num_workers=2)
    fresh = build_loader(shards, "train", cfg, train=True, rank=0, world_size=1, epoch=1)
    reference = [_snapshot(b) for b in fresh]
    loader = build_loader(shards, "train", cfg, train=True, rank=0, world_size=1)
    next(iter(loader))                                   # epoch 0 abandoned after one batch
    loader.set_epoch(1)
    assert all(_same(_snapshot(a), b) for a, b in zip(loader, reference))
    iterator = iter(loader)                              # epoch 1 again, cut at batch 2, resumed in place
    for _ in range(2):
        next(iterator)
    state = loader.state_dict()
    del iterator
    loader.load_state_dict(state)
    rest = [_snapshot(b) for b in loader]
    assert len(rest) == len(reference) - 2 and all(_same(a, b) for a, b in zip(rest, reference[2:]))
    loader.close()
    assert [b["key"] for b in loader][:1] == [reference[0]["key"]]   # new workers after close()


def test_loader_image_path_is_bit_identical_to_medfuse_transforms():
    from PIL import Image
    from shard_fixtures import jpeg
    from torchvision import transforms as T

    from kdscale.data.transforms import ToNormalizedTensor, build_image_transform, decode_for_transform, decode_image

    buf = io.BytesIO()
    Image.fromarray((np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 20)).save(buf, format="PNG")
    images = [jpeg(256, 320, 1, "L"), jpeg(90, 70, 2, "RGB"), jpeg(64, 48, 3, "L"), buf.getvalue()]
    for cfg in (loader_cfg(), loader_cfg(image_size=224, resize_size=256)):
        norm = ToNormalizedTensor(cfg.mean, cfg.std)
        for train in (True, False):
            medfuse = [T.Resize(cfg.resize_size)]
            if train:
                medfuse += [T.RandomHorizontalFlip(), T.RandomAffine(cfg.affine_degrees, shear=0, scale=tuple(
                    cfg.affine_scale), translate=(cfg.affine_translate, cfg.affine_translate))]
            medfuse = T.Compose(medfuse + [T.CenterCrop(cfg.image_size), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
            geometric = build_image_transform(cfg, train, to_tensor=False)
            for i, data in enumerate(images):
                for seed in range(3):
                    torch.manual_seed(seed)
                    want = medfuse(decode_image(data))
                    torch.manual_seed(seed)
                    whole = build_image_transform(cfg, train)(decode_for_transform(data))
                    torch.manual_seed(seed)
                    pixels = ToNormalizedTensor.pixels(geometric(decode_for_transform(data)))
                    into = norm.into(pixels, torch.empty(3, cfg.image_size, cfg.image_size))
                    assert torch.equal(want, whole) and torch.equal(want, into), (i, train, seed)


def test_npy_fast_path_matches_np_load():
    from kdscale.data.transforms import _npy

    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros((0, 4), np.float32), np.float32(3.5),
              np.arange(5, dtype=">f8"), np.array([1, 0], np.uint8), np.arange(4, dtype=np.float16),
              np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
              np.zeros(2, dtype=[("a", "<f4"), ("b", "<i2")])]
    for array in arrays:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        got = _npy(buf.getvalue())
        assert got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array)
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):                      # never unpickled
        _npy(buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.ones(8, np.float32))
    with pytest.raises(ValueError):                      # truncated data
        _npy(buf.getvalue()[:-4])


def test_tar_reader_matches_tarfile_and_is_strict(shards, tmp_path):
    from kdscale.data.tario import iter_members

    for path in sorted(shards.glob("*/*.tar")):
        with tarfile.open(path) as tar:
            want = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        assert list(iter_members(path)) == want
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):   # long names, links
        path = tmp_path / f"fmt{fmt}.tar"
        long_name = "d" * 120 + "/x.txt" if fmt == tarfile.USTAR_FORMAT else "k" * 150 + ".txt"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in (("a.json", b"{}"), (long_name, b"x" * 700), ("b.npy", b"\0" * 513)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("evil")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
        errors = []
        got = list(iter_members(path, lambda reason, detail: errors.append((reason, detail))))
        assert [n for n, _ in got] == ["a.json", long_name, "b.npy"] and got[2][1] == b"\0" * 513
        assert errors == [("unsafe member name", f"{path.name}: 'evil' is not a regular file")]
    data = (tmp_path / f"fmt{tarfile.PAX_FORMAT}.tar").read_bytes()
    with tarfile.open(tmp_path / f"fmt{tarfile.PAX_FORMAT}.tar") as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512          # before the end-of-archive blocks
    # tarfile itself ends quietly at a header boundary; a shard cut there is reported here
    for cut, members in ((0, 0), (512, 0), (1024, 1), (end, 3)):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        errors = []
        got = list(iter_members(tmp_path / "cut.tar", lambda reason, detail: errors.append(reason)))
        assert len(got) == members and errors[-1:] == ["truncated shard"], cut


def test_jpeg_draft_decodes_large_images_smaller_and_close(tmp_path):
    from PIL import Image
    from shard_fixtures import jpeg

    from kdscale.data.transforms import build_image_transform, decode_for_transform

    y, x = np.mgrid[0:700, 0:600]
    smooth = 100 + 60 * np.sin(x / 40.0) * np.cos(y / 55.0) + 40 * np.exp(-((x - 300) ** 2 + (y - 350) ** 2) / 8000)
    buf = io.BytesIO()
    Image.fromarray(smooth.astype(np.uint8), mode="L").save(buf, format="JPEG", quality=90)
    big = buf.getvalue()
    assert decode_for_transform(big).size == (600, 700)
    drafted = decode_for_transform(big, draft_shorter=64)
    assert 64 <= min(drafted.size) < 128 and drafted.mode == "L"
    assert decode_for_transform(jpeg(100, 120, 5, "L"), draft_shorter=64).size == (100, 120)   # < 2x: full
    cfg = loader_cfg(image_size=56, resize_size=64)
    full = build_image_transform(cfg, False)(decode_for_transform(big))
    fast = build_image_transform(cfg, False)(decode_for_transform(big, draft_shorter=64))
    assert full.shape == fast.shape == (3, 56, 56)
    assert (full - fast).abs().mean() < 0.02 * (full.max() - full.min())
