"""The soft-label shard format: the teacher pass's output, aligned 1:1 with the data shards.

It sits in the data layer beside the shard format (``shard_format``) because the loader joins
soft labels to samples while reading; the teacher pass (``kdscale.distill.teacher_pass``)
writes through it and ``kdscale.distill.softlabels_config`` holds the section's config.

For every data shard ``<data>/<split>/shard-NNNNNN.tar`` there is one soft-label shard
``<soft>/<split>/shard-NNNNNN.tar`` holding, for the same keys in the same order, packed arrays
(one tar member per ARRAY, not per sample: a tar member costs >= 1 KiB of header and padding,
which would dwarf 2 bytes x outputs x teachers):

    meta.json            format, data shard name + sha256, sample count, teachers fingerprint
    keys.json            the data shard's keys, in order
    logits.npy           float16 [N, K, C]   raw logits of the K teachers (index order), T = 1
    seen.npy             bool    [N, K]      teacher k had its modality for sample n
    ensemble.npy         float16 [N, G, C]   combined logits of the G ensembles (index order)
    ensemble_seen.npy    bool    [N, G]      at least one member of ensemble g saw sample n

Logits are stored raw so the distillation temperature can change at training time
(method-and-data.md §2.3). A teacher that did not see a sample stores zeros there and
``seen = False``; nothing is imputed.

``<soft>/index.json`` ties the set to the data shard hashes and the teacher checkpoint hashes;
``verify_softlabels`` checks coverage, alignment and staleness.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from kdscale.data.ingest import DataError
from kdscale.data.record import SPLITS
from kdscale.data.shard_format import npy_bytes
from kdscale.data.shard_index import read_index
from kdscale.data.tario import TarShardWriter, iter_members, iter_selected, sha256_file

FORMAT = "kdscale-softlabels/1"
ARRAYS = ("logits", "seen", "ensemble", "ensemble_seen")
MEMBERS = ("meta.json", "keys.json") + tuple(f"{a}.npy" for a in ARRAYS)


class StaleSoftLabels(DataError):
    """Soft labels computed from other data shards or other teacher checkpoints."""


@dataclass
class SoftShard:
    meta: dict
    keys: list[str]
    logits: np.ndarray          # [N, K, C] float16
    seen: np.ndarray            # [N, K] bool
    ensemble: np.ndarray        # [N, G, C] float16
    ensemble_seen: np.ndarray   # [N, G] bool

    def __len__(self) -> int:
        return len(self.keys)


def write_soft_shard(path: str | os.PathLike, shard: SoftShard) -> dict:
    """Atomic (temp file + rename): a soft-label shard either exists complete or not at all."""
    n = len(shard.keys)
    for name in ARRAYS:
        if getattr(shard, name).shape[0] != n:
            raise ValueError(f"{name} has {getattr(shard, name).shape[0]} rows for {n} keys")
    writer = TarShardWriter(path)
    try:
        writer.add("meta.json", json.dumps(shard.meta, sort_keys=True).encode())
        writer.add("keys.json", json.dumps(shard.keys).encode())
        writer.add("logits.npy", npy_bytes(shard.logits.astype(np.float16)))
        writer.add("seen.npy", npy_bytes(shard.seen.astype(bool)))
        writer.add("ensemble.npy", npy_bytes(shard.ensemble.astype(np.float16)))
        writer.add("ensemble_seen.npy", npy_bytes(shard.ensemble_seen.astype(bool)))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def read_soft_shard(path: str | os.PathLike) -> SoftShard:
    """Read and check one soft-label shard; any problem is a DataError naming the file."""
    path = Path(path)
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isreg() or info.name not in MEMBERS:
                    raise DataError(f"unexpected member {info.name!r} in a soft-label shard", file=path)
                members[info.name] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"unreadable soft-label shard ({type(exc).__name__}: {exc})", file=path) from None
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise DataError(f"soft-label shard lacks {missing} (truncated?)", file=path)
    try:
        meta = json.loads(members["meta.json"])
        keys = json.loads(members["keys.json"])
        arrays = {a: np.load(io.BytesIO(members[f"{a}.npy"]), allow_pickle=False) for a in ARRAYS}
    except ValueError as exc:
        raise DataError(f"corrupt soft-label shard member ({exc})", file=path) from None
    if meta.get("format") != FORMAT:
        raise DataError(f"soft-label format {meta.get('format')!r}, expected {FORMAT!r}", file=path)
    shard = SoftShard(meta, keys, **arrays)
    n, (k, g) = len(keys), (shard.seen.shape[1], shard.ensemble_seen.shape[1])
    shapes_ok = (shard.logits.shape[:2] == (n, k) and shard.seen.shape == (n, k)
                 and shard.ensemble.shape[:2] == (n, g) and shard.ensemble_seen.shape == (n, g)
                 and shard.logits.shape[2] == shard.ensemble.shape[2])
    if not shapes_ok:
        raise DataError(f"soft-label arrays disagree in shape: logits {shard.logits.shape}, seen "
                        f"{shard.seen.shape}, ensemble {shard.ensemble.shape}, ensemble_seen "
                        f"{shard.ensemble_seen.shape}, {n} keys", file=path)
    return shard


# ---------------------------------------------------------------------------------------------
# Index and staleness
# ---------------------------------------------------------------------------------------------

def teachers_fingerprint(teachers: list[dict], ensembles: list[dict]) -> str:
    """What the soft labels depend on besides the data: checkpoint hashes, order, combination."""
    payload = {"teachers": [(t["name"], t["checkpoint_sha256"]) for t in teachers],
               "ensembles": [(e["name"], e["members"], e["weights"], e["space"]) for e in ensembles]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def soft_shard_is_current(path: Path, data_entry: dict, fingerprint: str) -> bool:
    """A finished soft shard computed from this data shard and these teachers (restart check)."""
    if not path.is_file():
        return False
    try:
        meta = read_soft_shard(path).meta
    except DataError:
        return False
    return meta.get("data_sha256") == data_entry["sha256"] and meta.get("teachers") == fingerprint


def read_soft_index(soft_dir: str | os.PathLike) -> dict:
    path = Path(soft_dir) / "index.json"
    if not path.is_file():
        raise DataError("no index.json: the teacher pass has not finished (run `kdscale softlabels`)", file=path)
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise DataError(f"soft-label index format {index.get('format')!r}, expected {FORMAT!r}", file=path)
    return index


def verify_softlabels(soft_dir: str | os.PathLike, data_dir: Optional[str | os.PathLike] = None) -> list[str]:
    """Problems (empty = fine): every data shard has a soft shard with exactly its keys in order;
    the soft index's data hashes equal the data index's (else: data changed since -> stale); the
    teacher checkpoints on disk still have the recorded hashes (else: teachers changed -> stale);
    each soft shard's sha256 equals the index's."""
    soft_dir = Path(soft_dir)
    try:
        index = read_soft_index(soft_dir)
    except DataError as exc:
        return [str(exc)]
    data_dir = Path(data_dir or index["data_dir"])
    problems = []
    for teacher in index["teachers"]:
        ckpt = Path(teacher["checkpoint"])
        if not ckpt.is_file():
            problems.append(f"teacher {teacher['name']}: checkpoint {ckpt} is missing")
        elif sha256_file(ckpt) != teacher["checkpoint_sha256"]:
            problems.append(f"stale: teacher {teacher['name']} checkpoint {ckpt} changed since the soft labels "
                            f"were computed (re-run `kdscale softlabels`)")
    for split in [s for s in SPLITS if s in index["splits"]]:
        try:
            data_index = read_index(data_dir, split)
        except DataError as exc:
            problems.append(f"{split}: {exc}")
            continue
        soft_entries = {e["name"]: e for e in index["splits"][split]["shards"]}
        for entry in data_index["shards"]:
            where = f"{split}/{entry['name']}"
            soft = soft_entries.get(entry["name"])
            if soft is None:
                problems.append(f"{where}: no soft-label shard in index.json (coverage)")
                continue
            if soft["data_sha256"] != entry["sha256"]:
                problems.append(f"stale: {where}: data shard changed since the soft labels were computed")
            path = soft_dir / split / entry["name"]
            if not path.is_file():
                problems.append(f"{where}: soft-label shard missing")
                continue
            if sha256_file(path) != soft["sha256"]:
                problems.append(f"{where}: soft-label shard sha256 does not match index.json")
            try:
                keys = read_soft_shard(path).keys
            except DataError as exc:
                problems.append(str(exc))
                continue
            data_keys = _data_keys(iter_members(data_dir / split / entry["name"], lambda *_: None))
            if keys != data_keys:
                first = next((i for i, (a, b) in enumerate(zip(keys, data_keys)) if a != b),
                             min(len(keys), len(data_keys)))
                problems.append(f"{where}: soft-label keys differ from the data shard's at position {first} "
                                f"({len(keys)} vs {len(data_keys)} keys)")
        extra = sorted(set(soft_entries) - {e["name"] for e in data_index["shards"]})
        for name in extra:
            problems.append(f"{split}/{name}: soft-label shard without a data shard")
    for split in index["splits"]:
        if split not in SPLITS:
            problems.append(f"unknown split {split!r} in the soft-label index")
    return problems


def read_soft_split(soft_dir: str | os.PathLike, split: str, per_shard: Mapping[str, list[str]],
                    label_names: list[str]) -> tuple[dict, SoftShard]:
    """The soft labels of ``split``, aligned with the data shards: ``per_shard`` maps each data
    shard's name to its keys in order; returns the soft index and one SoftShard with every
    shard's arrays concatenated in that order. DataError naming the file when the soft labels
    lack the split or a shard, have other label names, or their keys differ from the data's."""
    soft_dir = Path(soft_dir)
    index = read_soft_index(soft_dir)
    if split not in index.get("splits", {}):
        raise DataError(f"the soft labels have no split {split!r} (softlabels.splits)", file=soft_dir / "index.json")
    if list(index["label_names"]) != list(label_names):
        raise DataError("the soft labels' label names differ from the data shards'", file=soft_dir / "index.json")
    entries = {e["name"] for e in index["splits"][split]["shards"]}
    shards = []
    for name, keys in per_shard.items():
        if name not in entries:
            raise DataError(f"no soft-label shard for data shard {split}/{name}", file=soft_dir / "index.json")
        soft = read_soft_shard(soft_dir / split / name)
        if soft.keys != list(keys):
            raise DataError(f"soft-label keys differ from the data shard {split}/{name}'s (stale soft labels? "
                            f"run `kdscale softlabels`)", file=soft_dir / split / name)
        shards.append(soft)
    if not shards:
        raise DataError(f"split {split!r} has no samples", file=soft_dir / split)
    return index, concat_soft_shards(shards)


def concat_soft_shards(shards: list[SoftShard]) -> SoftShard:
    """One SoftShard holding ``shards`` one after the other (keys and every array)."""
    return SoftShard(meta={}, keys=[k for sh in shards for k in sh.keys],
                     **{a: np.concatenate([getattr(sh, a) for sh in shards]) for a in ARRAYS})


@dataclass
class SplitEnsembles:
    """The teacher ensembles' stored logits on one split, aligned with the split's hard labels."""
    keys: list[str]
    label_names: list[str]
    ensemble_names: list[str]
    labels: np.ndarray          # [N, C] float (NaN = unknown)
    ensemble: np.ndarray        # [N, G, C] float32 logits at T = 1
    ensemble_seen: np.ndarray   # [N, G] bool


def read_split_ensembles(soft_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str) -> SplitEnsembles:
    """The ensembles' logits and the hard labels of every sample of ``split`` (the data shards'
    labels.npy members only; images are never read), aligned by :func:`read_soft_split`."""
    data_dir = Path(data_dir)
    data_index = read_index(data_dir, split)
    names = list(data_index["label_names"])
    per_shard, labels = {}, []
    for entry in data_index["shards"]:
        path = data_dir / split / entry["name"]
        shard_labels = {k: np.load(io.BytesIO(v), allow_pickle=False) for k, v in iter_selected(path, "labels.npy")}
        for key, y in shard_labels.items():
            if y.shape != (len(names),):
                raise DataError(f"sample {key!r}: {y.shape} labels, the index declares {len(names)}", file=path)
        per_shard[entry["name"]] = list(shard_labels)
        labels += [y.astype(np.float64) for y in shard_labels.values()]
    index, soft = read_soft_split(soft_dir, split, per_shard, names)
    return SplitEnsembles(keys=soft.keys, label_names=names, ensemble_names=list(index["ensemble_names"]),
                          labels=np.stack(labels), ensemble=soft.ensemble.astype(np.float32),
                          ensemble_seen=soft.ensemble_seen)


def _data_keys(members) -> list[str]:
    keys: list[str] = []
    for name, _ in members:
        key = name.split(".", 1)[0]
        if not keys or keys[-1] != key:
            keys.append(key)
    return keys
