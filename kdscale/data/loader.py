"""Shards -> training batches, equal in number on every rank (epoch semantics: shards/README.md).

An epoch is a sequence G_e of all N samples of the split: the shards in an order permuted by
(seed, epoch) -- identical on every rank -- each shard's samples in tar order (eval: index
order). The S = world_size x workers reader slots (slot = rank * workers + worker) each take a
contiguous range of G_e of exactly ``quota = batches_per_slot x batch_size`` samples, so every
worker yields ``batches_per_slot`` full batches and every rank ``batches_per_slot x workers``:

* train: slot j reads positions [j*quota, (j+1)*quota) modulo N, shuffled through a buffer
  seeded by (seed, epoch, slot). ``drop_last`` -> batches_per_slot = N // (S*batch) (the tail of
  G_e is left out this epoch), else ceil (the first samples of G_e are repeated to fill).
* eval: slot j's real samples are [floor(jN/S), floor((j+1)N/S)); it is padded to the common
  quota with samples flagged ``valid=False``, so each sample is valid exactly once across ranks.

``require`` (e.g. ``["image"]`` for an image teacher): G_e holds only the samples that have every
required modality, N counts only those (from the per-shard presence counts in index.json), and
positions are counted over them; the others are passed over while reading (their soft labels are
still checked for alignment).

A corrupt sample is skipped and counted; the slot then reads on past its range (train: valid
repeats, eval: invalid padding), so batch counts never change. Decoding happens after the
shuffle buffer (it holds raw bytes). Resume: ``state_dict()`` = (epoch, batches consumed on this
rank); each worker skips its share of raw samples without decoding them, and augmentation is
seeded per sample by (seed, epoch, position), so a resumed epoch continues exactly.

Workers are persistent (started at the first epoch, reused after): the epoch and resume batch of
each iteration reach them through a small shared-memory tensor that the training process sets
before the iteration starts and each worker reads when it begins its slot of that epoch.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.utils.data
from torch.multiprocessing.reductions import StorageWeakRef

from kdscale.data.ingest import DataError
from kdscale.data.loader_config import IMAGENET_MEAN, IMAGENET_STD, LoaderConfig  # noqa: F401  (re-exported)
from kdscale.data.shard_format import MODALITY_MEMBERS
from kdscale.data.shard_index import read_index
from kdscale.data.softlabel_format import ARRAYS, read_soft_shard
from kdscale.data.tario import iter_samples
from kdscale.data.transforms import SampleDecoder, _batch_tensor, collate

log = logging.getLogger(__name__)

# Reusable shared-memory batch buffers per worker: prefetch_factor (in flight) + this many (the
# batch being filled, the one the training loop holds; measured: no fresh allocations with 2).
BUFFER_SLOTS_EXTRA = 2

class SoftLabelError(DataError):
    """The soft-label shards are not aligned with the data shards (names the shard and key)."""


# ---------------------------------------------------------------------------------------------
# Epoch plan: pure arithmetic, identical on every rank and worker
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpochPlan:
    num_samples: int
    slots: int
    batch_size: int
    batches_per_slot: int
    train: bool

    @classmethod
    def make(cls, num_samples: int, world_size: int, workers: int, batch_size: int, train: bool,
             drop_last: bool) -> "EpochPlan":
        slots = world_size * max(1, workers)
        if num_samples < 1:
            raise DataError("the split has no samples")
        if not train:
            per = math.ceil(math.ceil(num_samples / slots) / batch_size)
        elif drop_last:
            per = num_samples // (slots * batch_size)
            if per == 0:
                raise DataError(
                    f"the split has {num_samples} samples, fewer than batch_size {batch_size} x world_size "
                    f"{world_size} x workers {max(1, workers)} = {slots * batch_size}: with drop_last every "
                    f"rank would get 0 batches; lower batch_size or loader.num_workers, or set drop_last false")
        else:
            per = math.ceil(num_samples / (slots * batch_size))
        return cls(num_samples, slots, batch_size, per, train)

    @property
    def quota(self) -> int:
        return self.batches_per_slot * self.batch_size

    def slot_range(self, slot: int) -> tuple[int, Optional[int]]:
        """-> (first position, end of valid positions or None = all valid)."""
        if self.train:
            return slot * self.quota, None
        n, s = self.num_samples, self.slots
        return slot * n // s, (slot + 1) * n // s


def shard_order(num_shards: int, seed: int, epoch: int, train: bool) -> list[int]:
    order = list(range(num_shards))
    if train:  # str seeds hash with sha512: the same permutation in every process
        random.Random(f"kdscale-shards:{seed}:{epoch}").shuffle(order)
    return order


# ---------------------------------------------------------------------------------------------
# Per-worker pipeline: read range -> shuffle (raw) -> skip (resume) -> decode -> batch
# ---------------------------------------------------------------------------------------------

class _Errors:
    def __init__(self, max_logged: int, where: str):
        self.counts: Counter = Counter()
        self.unreported: Counter = Counter()
        self.max_logged, self.where = max_logged, where

    def __call__(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        self.unreported[reason] += 1
        if self.counts[reason] <= self.max_logged:
            log.warning("%s: skipped sample: %s: %s%s", self.where, reason, detail,
                        " (further ones counted, not logged)" if self.counts[reason] == self.max_logged else "")

    def take(self) -> dict:
        out, self.unreported = dict(self.unreported), Counter()
        return out


@dataclass
class _Spec:
    """Everything a worker needs; plain data so it pickles under any start method."""
    shards: list[tuple[str, int]]          # (path, samples in G_e: all, or those with `require`) in index order
    soft_shards: Optional[list[str]]
    plan: EpochPlan
    cfg: LoaderConfig
    train: bool
    epoch: int
    rank: int
    workers: int
    start_batch: int
    n_labels: int
    n_features: int
    normalizer: Optional[dict]
    # per shard (all samples, sha256) from index.json: what a read is checked against
    checks: Optional[list[tuple[int, str]]] = None


# Shards whose sha256 this process has already checked, as (path, sha256): each shard is hashed
# at most once per process (and only while it is read whole anyway: hashing, not a second read).
_VERIFIED_SHARDS: set[tuple[str, str]] = set()


class _EpochState:
    """Shared memory between the training process and its persistent workers.

    ``values`` = (epoch, start batch, iteration number) of the current iteration: the training
    process sets them before an iteration starts, each worker reads them when it begins its slot
    of that iteration. ``slots`` [workers, pool size]: the state of each worker's reusable batch
    buffers (``_BufferPool``): 0 = free, else the iteration number that took it. Pickles as
    shared memory under any start method."""

    def __init__(self, workers: int, pool: int):
        self.values = torch.zeros(3, dtype=torch.int64).share_memory_()
        self.slots = torch.zeros(max(1, workers), max(1, pool), dtype=torch.int64).share_memory_()

    def set(self, epoch: int, start_batch: int, iteration: int) -> None:
        self.values[0], self.values[1], self.values[2] = epoch, start_batch, iteration

    def get(self) -> tuple[int, int, int]:
        epoch, start, iteration = self.values.tolist()
        return int(epoch), int(start), int(iteration)


class _BufferPool:
    """Worker side: shared-memory batch tensors reused from batch to batch.

    A batch tensor already in shared memory is sent to the training process without a copy, but
    a fresh one costs its page faults (the kernel zero-fills every page) in the worker and its
    unmapping later: ~15 ms for a [32, 3, 224, 224] float batch on a 2-core VM, more than
    decoding the batch. So each worker keeps a few buffer sets ("slots"). A batch takes a free
    slot (state = this iteration's number); the training process frees the slot when every
    tensor of that batch is gone (weak references: a batch the caller keeps is never
    overwritten), or at a later iteration when the batch was discarded by a cut-short one. No
    free slot: a fresh tensor, as before."""

    def __init__(self, states, iteration: int):
        self.states, self.iteration = states, iteration        # states: this worker's row of slots
        self.buffers: list[dict] = [{} for _ in range(len(states))]
        self.current: Optional[int] = None

    def take(self) -> Optional[int]:
        self.current = None
        for slot, state in enumerate(self.states.tolist()):
            if state == 0:
                self.states[slot] = self.iteration
                self.current = slot
                break
        return self.current

    def alloc(self, name: str, shape: tuple, dtype):
        if self.current is None:
            return _batch_tensor(shape, dtype)
        numel = math.prod(shape)
        buf = self.buffers[self.current].get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = self.buffers[self.current][name] = _batch_tensor((numel,), dtype)
        return buf[:numel].view(shape)


class _Held:
    """Training-process side of ``_BufferPool``: frees a worker's slot when the batch is gone."""

    def __init__(self, state: _EpochState):
        self.state, self.held = state, []   # [(worker, slot, [StorageWeakRef])]

    def add(self, where: tuple[int, int], batch: dict) -> None:
        refs = [StorageWeakRef(t.untyped_storage()) for t in _tensors(batch)]
        self.held.append((where[0], where[1], refs))

    def release(self, iteration: int) -> None:
        keep, held_slots = [], set()
        for worker, slot, refs in self.held:
            if all(ref.expired() for ref in refs):
                self.state.slots[worker, slot] = 0
            else:
                keep.append((worker, slot, refs))
                held_slots.add((worker, slot))
        self.held = keep
        # slots taken in an earlier iteration and never received: their batch was discarded when
        # that iteration was cut short (nothing of it is in flight once a new one has started)
        stale = ((self.state.slots > 0) & (self.state.slots < iteration)).nonzero().tolist()
        for worker, slot in stale:
            if (worker, slot) not in held_slots:
                self.state.slots[worker, slot] = 0


def _tensors(batch: dict) -> list:
    return [batch[k] for k in ("image", "ehr") if k in batch]


class _SlotPipeline:
    """Called once per worker and iteration; yields this slot's batches of the current epoch."""

    def __init__(self, spec: _Spec, state: Optional[_EpochState] = None):
        self.spec, self.state = spec, state

    def __call__(self) -> Iterator[dict]:
        spec, pool = self.spec, None
        info = torch.utils.data.get_worker_info()
        process = info.id if info is not None else 0
        if self.state is not None:
            epoch, start_batch, iteration = self.state.get()
            spec = dataclasses.replace(spec, epoch=epoch, start_batch=start_batch)
            if info is not None:
                pool = self._pool(process, iteration)
        own = max(1, spec.workers)
        # The DataLoader takes batches round-robin from worker process 0 on. Batch b of the epoch
        # belongs to reader worker b % workers, so on a resume at batch s process i plays reader
        # worker (i + s) % workers: the batches then come in the uninterrupted epoch's order.
        worker = (process + spec.start_batch) % own
        slot = spec.rank * own + worker
        errors = _Errors(spec.cfg.max_logged_errors, f"rank {spec.rank} worker {worker}")
        reader = _RangeReader(spec, errors)
        start, valid_end = spec.plan.slot_range(slot)
        quota = spec.plan.quota
        raw = reader.read(start, start + quota)
        if spec.train and spec.cfg.shuffle_buffer > 1:
            rng = random.Random(f"kdscale-sample:{spec.cfg.seed}:{spec.epoch}:{slot}")
            raw = _shuffle(raw, spec.cfg.shuffle_buffer, rng)
        stream = _chain(raw, reader.read(start + quota, None))  # fill: past the range, only if needed
        skip_batches = len(range(worker, spec.start_batch, own))
        for _ in range(skip_batches * spec.plan.batch_size):   # resume: no decoding
            next(stream)
        decoder = SampleDecoder(spec, errors)
        yield from _batches(stream, decoder, valid_end, quota - skip_batches * spec.plan.batch_size,
                            spec, errors, pool, process)

    def _pool(self, process: int, iteration: int) -> "_BufferPool":
        """This worker process's buffer pool, kept across iterations (persistent workers)."""
        pool = getattr(self, "_buffer_pool", None)
        if pool is None:
            pool = self._buffer_pool = _BufferPool(self.state.slots[process], iteration)
        pool.iteration = iteration
        return pool


def _shuffle(data: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer of ``bufsize`` raw samples, filled before the first one leaves
    (webdataset's ``shuffle(bufsize, initial=bufsize)``, same draws, same order)."""
    buf: list = []
    for sample in data:
        buf.append(sample)
        if len(buf) < bufsize:
            nxt = next(data, _END)
            if nxt is not _END:
                buf.append(nxt)
        if len(buf) >= bufsize:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


_END = object()


def _pick(buf: list, rng: random.Random):
    k = rng.randint(0, len(buf) - 1)
    sample = buf[k]
    buf[k] = buf[-1]
    buf.pop()
    return sample


def _chain(a, b):
    yield from a
    yield from b


def _batches(stream, decoder, valid_end, n_good: int, spec: _Spec, errors: _Errors,
             pool: Optional[_BufferPool] = None, process: int = 0) -> Iterator[dict]:
    batch, failures = [], 0
    limit = spec.plan.num_samples + spec.plan.quota  # a whole cycle without one good sample: give up
    while n_good > 0:
        raw = next(stream)
        sample = decoder(raw)
        if sample is None:
            failures += 1
            if failures > limit:
                raise DataError(f"no decodable sample in {failures} consecutive reads: {dict(errors.counts)}")
            continue
        failures = 0
        sample["valid"] = valid_end is None or raw["__pos__"] < valid_end
        batch.append(sample)
        n_good -= 1
        if len(batch) == spec.plan.batch_size:
            slot = pool.take() if pool is not None else None
            out = collate(batch, spec.cfg, spec.n_features, alloc=pool.alloc if pool is not None else None)
            out["_skipped"] = errors.take()
            if slot is not None:
                out["_slot"] = (process, slot)
            yield out
            batch = []


def has_modalities(sample: dict, require) -> bool:
    """Whether a raw sample (member ext -> bytes) holds a member of every modality in ``require``."""
    return all(any(ext in sample for ext in MODALITY_MEMBERS[m]) for m in require)


class _RangeReader:
    """Reads positions of the epoch sequence G_e (modulo N), joining soft-label shards by key.
    With ``cfg.require``, G_e and the positions count only the samples that have those modalities."""

    def __init__(self, spec: _Spec, errors: _Errors):
        self.spec, self.errors = spec, errors
        self.require = tuple(spec.cfg.require)
        order = shard_order(len(spec.shards), spec.cfg.seed, spec.epoch, spec.train)
        self.order = order
        self.starts, total = [], 0
        for k in order:
            self.starts.append(total)
            total += spec.shards[k][1]
        self.n = total

    def read(self, start: int, stop: Optional[int]) -> Iterator[dict]:
        pos = last_read = start
        while stop is None or pos < stop:
            if pos - last_read > self.n:  # a whole pass without one readable sample: never hang
                raise DataError(f"no readable sample in a full pass over {len(self.order)} shards "
                                f"(truncated or unreadable?): {dict(self.errors.counts)}")
            local = pos % self.n
            i = bisect.bisect_right(self.starts, local) - 1   # a shard with 0 samples in G_e is never i
            k = self.order[i]
            offset = local - self.starts[i]
            take = self.spec.shards[k][1] - offset
            if stop is not None:
                take = min(take, stop - pos)
            for j, sample in enumerate(self._shard(k, offset, take)):
                sample["__pos__"] = last_read = pos + j
                yield sample
            pos += take

    def _shard(self, k: int, offset: int, take: int) -> Iterator[dict]:
        """Samples [offset, offset + take) of shard k, counted over the samples in G_e.

        Checked against index.json as it reads (a mismatch is a DataError naming the shard: the
        shard was changed after the build, and reading on would give silent duplicates or
        unverified data): a range that ends early (fewer samples than the index says); a range
        that reaches the shard's end reads on to the end of the tar, so a shard with more samples
        than listed is caught too, and has its sha256 checked (once per shard and process).
        A truncated shard stays a counted skip ("truncated shard")."""
        path = self.spec.shards[k][0]
        name = Path(path).name
        expected = self.spec.checks[k] if self.spec.checks is not None else None
        truncated: list[str] = []

        def on_error(reason: str, detail: str) -> None:
            if reason == "truncated shard":
                truncated.append(detail)
            self.errors(reason, detail)

        in_ge = self.spec.shards[k][1]
        reaches_end = offset + take >= in_ge
        digest = None
        # every range reads its shard from byte 0 (samples before `offset` are passed over), so
        # the range that reaches the shard's end reads all of it: hash there
        if expected is not None and expected[1] and reaches_end and (path, expected[1]) not in _VERIFIED_SHARDS:
            digest = hashlib.sha256()
        samples = iter_samples(path, on_error, digest=digest)
        soft = None
        if self.spec.soft_shards is not None:
            soft_path = self.spec.soft_shards[k]
            soft = iter_soft_rows(soft_path)
        require, seen = self.require, 0   # seen: samples of G_e passed so far in this shard
        # A range that ends with the shard's last sample of G_e reads on to the end of the tar: the
        # count check, the hash, and the soft-label check of filtered-out samples after it (no
        # other range passes them: every sample's soft labels are checked).
        to_end = reaches_end and (expected is not None or (require and soft is not None))
        total = 0
        for i, sample in enumerate(samples):
            total = i + 1
            if seen >= offset + take and not to_end:
                return
            if soft is not None:  # checked for skipped and filtered-out samples too: misalignment is always an error
                _join_soft(sample, soft, self.spec.soft_shards[k], i)
            if require and not has_modalities(sample, require):
                continue
            if seen >= offset + take:
                if expected is not None and not truncated:
                    raise DataError(f"shard {name} holds more samples than its index.json lists ({in_ge}"
                                    f"{' with ' + '+'.join(require) if require else ''}): it was changed after "
                                    f"the build; run `kdscale verify` and rebuild it", file=path)
                return
            if seen >= offset:
                sample["__shard__"] = name
                yield sample
            seen += 1
        if expected is None or truncated:
            return   # a truncated shard: its samples are a counted skip (reported by iter_members)
        if seen < offset + take or (reaches_end and total != expected[0]):
            raise DataError(f"shard {name} holds {total if reaches_end else 'fewer'} samples, its index.json "
                            f"says {expected[0]}: it was changed after the build (reading on would repeat "
                            f"samples); run `kdscale verify` and rebuild it", file=path)
        if digest is not None:
            if digest.hexdigest() != expected[1]:
                raise DataError(f"shard {name}: sha256 does not match index.json (modified or corrupt since the "
                                f"build); run `kdscale verify` and rebuild it", file=path)
            _VERIFIED_SHARDS.add((path, expected[1]))


def iter_soft_rows(path: str) -> Iterator[dict]:
    """The rows of a packed soft-label shard (kdscale.data.softlabel_format) as per-sample dicts
    ``{"__key__", "logits.npy", "seen.npy", "ensemble.npy", "ensemble_seen.npy"}`` (arrays)."""
    shard = read_soft_shard(path)
    arrays = {f"{name}.npy": getattr(shard, name) for name in ARRAYS}
    for i, key in enumerate(shard.keys):
        yield {"__key__": key, **{ext: array[i] for ext, array in arrays.items()}}


def _join_soft(sample: dict, soft: Iterator[dict], soft_path: str, i: int) -> None:
    key = sample["__key__"]
    other = next(soft, None)
    if other is None:
        raise SoftLabelError(f"soft-label shard {soft_path}: missing key {key} (shard ends after {i} samples)")
    if other["__key__"] != key:
        raise SoftLabelError(f"soft-label shard {soft_path}: sample {i} has key {other['__key__']}, the data "
                             f"shard has {key} (soft labels must hold the same keys in the same order)")
    for ext, data in other.items():
        if ext != "__key__":
            sample["soft:" + ext] = data


def _qualifying_counts(index: dict, require: list[str], shard_dir: Path, split: str) -> list[int]:
    """Samples per shard that have every modality in ``require`` (all samples when empty), from
    the per-shard presence counts in index.json."""
    if not require:
        return [int(s["count"]) for s in index["shards"]]
    want, counts = set(require), []
    for entry in index["shards"]:
        patterns = entry.get("presence_patterns")
        if patterns is not None:
            counts.append(sum(int(n) for combo, n in patterns.items() if want <= set(combo.split("+"))))
        elif len(want) == 1 and "presence" in entry:
            counts.append(int(entry["presence"].get(require[0], 0)))
        else:
            raise DataError(f"loader.require={list(require)}: index.json of split {split!r} has no per-shard "
                            f"presence counts (the shards were built by an older kdscale); rebuild the shards "
                            f"(into a new shards.out_dir, or delete {shard_dir} first)",
                            file=shard_dir / split / "index.json")
    return counts


class _SlotDataset(torch.utils.data.IterableDataset):
    """An IterableDataset over one rank's reader slots."""

    def __init__(self, pipeline: _SlotPipeline):
        self.pipeline = pipeline

    def __iter__(self) -> Iterator[dict]:
        return self.pipeline()


def _identity(batch):
    return batch


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------

def _world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardLoader:
    """Iterable over one epoch of batches of one split; the same ``len()`` on every rank.

    ``set_epoch(e)`` before each epoch (like DistributedSampler). ``skipped`` counts the
    samples skipped in the current/last epoch by reason (corrupt, incomplete, truncated shard).
    ``state_dict()``/``load_state_dict()`` give exact mid-epoch resume with the same world size,
    workers, batch size, seed and ``require``. With ``num_workers > 0`` the worker processes are
    started by the first iteration and kept for the next epochs (``loader.persistent_workers``;
    ``close()`` ends them, so does dropping the loader). One iteration at a time: starting a new
    one ends the previous one. Batches are in shared memory that a worker reuses once the batch is
    gone: do not hand batch tensors on to other processes without copying them.
    """

    def __init__(self, shard_dir, split: str, cfg: LoaderConfig, *, train: bool, rank: Optional[int] = None,
                 world_size: Optional[int] = None, epoch: int = 0, soft_dir=None):
        self.shard_dir, self.split, self.cfg, self.train = Path(shard_dir), split, cfg, train
        self.rank, self.world_size = _world(rank, world_size)
        self.index = read_index(self.shard_dir, split)
        counts = _qualifying_counts(self.index, list(cfg.require), self.shard_dir, split)
        self.shards = [(str(self.shard_dir / split / s["name"]), n) for s, n in zip(self.index["shards"], counts)]
        self.checks = _check_shard_files(self.shard_dir, split, self.index)
        self.num_samples = sum(counts)
        if cfg.require and self.num_samples == 0:
            raise DataError(f"split {split!r}: none of its {self.index['num_samples']} samples has "
                            f"{' and '.join(cfg.require)} (loader.require={list(cfg.require)}; samples per "
                            f"modality: {self.index.get('presence')})", file=self.shard_dir / split / "index.json")
        self.soft_shards = _soft_shards(soft_dir, split, self.index) if soft_dir is not None else None
        self.plan = EpochPlan.make(self.num_samples, self.world_size, cfg.num_workers, cfg.batch_size,
                                   train, cfg.drop_last)
        if self.plan.slots > len(self.shards) and self.rank == 0:
            log.info("%s: %d reader slots (world %d x workers %d) share %d shards: slots read sub-ranges of "
                     "shards (correct, but smaller shards would avoid re-reading prefixes)", split,
                     self.plan.slots, self.world_size, max(1, cfg.num_workers), len(self.shards))
        self.epoch, self.position, self._start_batch = epoch, 0, 0
        self.skipped: Counter = Counter()
        ehr = self.index.get("ehr") or {}
        self.n_features, self.normalizer = int(ehr.get("num_features", 0)), ehr.get("normalizer")
        if cfg.normalize_ehr and self.normalizer is None and ehr.get("num_features"):
            log.warning("%s: index.json has no EHR normalizer: EHR values are passed raw", split)
        self._dataloader, self._dataloader_cfg = None, None   # persistent, made by the first iteration
        self._state: Optional[_EpochState] = None
        self._held: Optional[_Held] = None
        self._iteration = 0

    def __len__(self) -> int:
        return self.plan.batches_per_slot * max(1, self.cfg.num_workers)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._start_batch = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.position, **self._geometry()}

    def load_state_dict(self, state: dict) -> None:
        """Continue at batch ``state["batch"]`` of epoch ``state["epoch"]`` on the next iteration."""
        defaults = {"require": []}    # states saved before loader.require existed
        mismatch = {k: (state.get(k, defaults.get(k)), v) for k, v in self._geometry().items()
                    if state.get(k, defaults.get(k)) != v}
        if mismatch:
            raise ValueError(f"loader state is from another geometry {mismatch} (saved, now): the sample "
                             f"order differs; resume with the same world size, workers, batch size, seed and "
                             f"require")
        self.epoch, self._start_batch = int(state["epoch"]), int(state["batch"])

    def _geometry(self) -> dict:
        return {"world_size": self.world_size, "num_workers": self.cfg.num_workers,
                "batch_size": self.cfg.batch_size, "seed": self.cfg.seed,
                "num_samples": self.plan.num_samples, "train": self.train, "require": sorted(self.cfg.require)}

    def _spec(self, start_batch: int) -> _Spec:
        return _Spec(self.shards, self.soft_shards, self.plan, self.cfg, self.train, self.epoch, self.rank,
                     self.cfg.num_workers, start_batch, len(self.index["label_names"]), self.n_features,
                     self.normalizer, self.checks)

    def _loader(self, start: int):
        """The DataLoader of this iteration: the persistent one (workers read the epoch and start
        batch from ``self._state``), or with 0 workers a fresh in-process one."""
        if self.cfg.num_workers == 0:
            return torch.utils.data.DataLoader(_SlotDataset(_SlotPipeline(self._spec(start))), batch_size=None,
                                               collate_fn=_identity, pin_memory=self.cfg.pin_memory,
                                               generator=_private_generator())
        if self._state is None:
            self._state = _EpochState(self.cfg.num_workers, self.cfg.prefetch_factor + BUFFER_SLOTS_EXTRA)
            self._held = _Held(self._state)
        self._iteration += 1
        self._state.set(self.epoch, start, self._iteration)   # before the iteration starts: workers read it then
        cfg_now = repr(self.cfg)   # the workers hold the config of their start: a changed one needs new workers
        if self._dataloader is None or self._dataloader_cfg != cfg_now or not self.cfg.persistent_workers:
            self._dataloader, self._dataloader_cfg = torch.utils.data.DataLoader(
                _SlotDataset(_SlotPipeline(self._spec(0), self._state)), batch_size=None, collate_fn=_identity,
                num_workers=self.cfg.num_workers, pin_memory=self.cfg.pin_memory,
                prefetch_factor=self.cfg.prefetch_factor, persistent_workers=self.cfg.persistent_workers,
                generator=_private_generator()), cfg_now
        return self._dataloader

    def close(self) -> None:
        """End the persistent worker processes (a later iteration starts new ones)."""
        self._dataloader, self._state, self._held = None, None, None

    def __getstate__(self) -> dict:   # worker processes and shared memory do not travel
        return {**self.__dict__, "_dataloader": None, "_state": None, "_held": None}

    def __iter__(self) -> Iterator[dict]:
        if "image" in self.cfg.modalities:
            # only when images are loaded: once here, not in every forked worker
            import torchvision.transforms  # noqa: F401
        start, self._start_batch = self._start_batch, 0
        self.position, self.skipped = start, Counter()
        for batch in self._loader(start):
            self.skipped.update(batch.pop("_skipped"))
            where = batch.pop("_slot", None)
            if where is not None:
                self._held.add(where, batch)
            if self._held is not None:
                self._held.release(self._iteration)
            self.position += 1
            yield batch
            del batch   # the caller's reference is what keeps its buffers from reuse
        if self.skipped:
            log.warning("%s epoch %d rank %d: skipped %d samples (%s)", self.split, self.epoch, self.rank,
                        self.num_skipped, ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())))


def _check_shard_files(shard_dir: Path, split: str, index: dict) -> list[tuple[int, str]]:
    """Every shard of the split exists with the size index.json records (a stat per shard: a shard
    grown, shrunk or replaced since the build is an error naming it, before any batch); -> per
    shard (sample count, sha256) for the checks made while reading (``_RangeReader._shard``)."""
    checks = []
    for entry in index["shards"]:
        path = shard_dir / split / entry["name"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"shard {entry['name']} of split {split!r} is missing (listed in index.json)",
                            file=path) from None
        if "bytes" in entry and size != int(entry["bytes"]):
            raise DataError(f"shard {entry['name']} is {size} bytes, its index.json says {entry['bytes']}: it was "
                            f"changed after the build; run `kdscale verify` and rebuild it", file=path)
        checks.append((int(entry["count"]), str(entry.get("sha256", ""))))
    return checks


def _soft_shards(soft_dir, split: str, index: dict) -> list[str]:
    paths = [Path(soft_dir) / split / s["name"] for s in index["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SoftLabelError(f"soft-label shards missing for split {split!r}: {missing[:3]}"
                             + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return [str(p) for p in paths]


def _private_generator():
    """A DataLoader draws its base seed from its generator each time an iterator starts; with the
    default (the GLOBAL torch generator) starting an epoch's iterator shifts the model's dropout
    stream, so a run resumed mid-epoch (new iterator after restoring the RNG) would diverge from
    an uninterrupted one. Our samples are seeded by (seed, epoch, position) and never use that
    base seed, so a private generator keeps the global stream untouched."""
    return torch.Generator().manual_seed(0)


def build_loader(shard_dir, split: str, cfg: LoaderConfig, *, train: bool, rank: Optional[int] = None,
                 world_size: Optional[int] = None, epoch: int = 0, soft_dir=None) -> ShardLoader:
    """The loader of ``<shard_dir>/<split>``. rank/world_size default to torch.distributed (if
    initialised), else $RANK/$WORLD_SIZE, else 0/1. ``soft_dir`` joins an aligned soft-label
    shard set (same split folders, shard names and keys in the same order)."""
    return ShardLoader(shard_dir, split, cfg, train=train, rank=rank, world_size=world_size, epoch=epoch,
                       soft_dir=soft_dir)
