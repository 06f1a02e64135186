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

A corrupt sample is skipped and counted; the slot then reads on past its range (train: valid
repeats, eval: invalid padding), so batch counts never change. Decoding happens after the
shuffle buffer (it holds raw bytes). Resume: ``state_dict()`` = (epoch, batches consumed on this
rank); each worker skips its share of raw samples without decoding them, and augmentation is
seeded per sample by (seed, epoch, position), so a resumed epoch continues exactly.
"""
from __future__ import annotations

import bisect
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

from kdscale.data.ingest import DataError
from kdscale.data.record import MODALITIES
from kdscale.data.shard_index import read_index
from kdscale.data.tario import is_soft_ext, iter_samples
from kdscale.data.transforms import SampleDecoder, collate

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class LoaderConfig:
    batch_size: int = 64
    num_workers: int = 2                  # per rank; 0 = read in the training process
    shuffle_buffer: int = 1000            # train only, raw samples per worker; 0 = no sample shuffle
    seed: int = 0
    drop_last: bool = True                # train only (MedFuse trains with drop_last=True)
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))  # others are not loaded
    image_size: int = 224                 # CenterCrop
    resize_size: int = 256                # Resize of the shorter side before the crop
    augment: Literal["medfuse", "none"] = "medfuse"
    hflip: bool = True
    affine_degrees: float = 45.0
    affine_translate: float = 0.15
    affine_scale: list[float] = field(default_factory=lambda: [0.85, 1.15])
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    normalize_ehr: bool = True            # with the train-fitted normalizer stored in index.json
    prefetch_factor: int = 2
    pin_memory: bool = False
    max_logged_errors: int = 3            # per reason and worker; the counts are always complete

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size", "resize_size", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"loader.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("loader.num_workers and loader.shuffle_buffer must be >= 0")
        unknown = sorted(set(self.modalities) - set(MODALITIES))
        if unknown:
            raise ValueError(f"loader.modalities: unknown {unknown}; valid: {list(MODALITIES)}")
        if len(self.affine_scale) != 2 or len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("loader.affine_scale needs 2 numbers, loader.mean and loader.std 3 each")


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
    shards: list[tuple[str, int]]          # (path, count) in index order
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


class _SlotPipeline:
    """Called once per worker (webdataset DataPipeline source); yields this slot's batches."""

    def __init__(self, spec: _Spec):
        self.spec = spec

    def __call__(self) -> Iterator[dict]:
        import torch.utils.data

        spec = self.spec
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        slot = spec.rank * max(1, spec.workers) + worker
        errors = _Errors(spec.cfg.max_logged_errors, f"rank {spec.rank} worker {worker}")
        reader = _RangeReader(spec, errors)
        start, valid_end = spec.plan.slot_range(slot)
        quota = spec.plan.quota
        raw = reader.read(start, start + quota)
        if spec.train and spec.cfg.shuffle_buffer > 1:
            from webdataset.filters import _shuffle
            rng = random.Random(f"kdscale-sample:{spec.cfg.seed}:{spec.epoch}:{slot}")
            buf = spec.cfg.shuffle_buffer
            raw = _shuffle(iter(raw), bufsize=buf, initial=buf, rng=rng)
        stream = _chain(raw, reader.read(start + quota, None))  # fill: past the range, only if needed
        own = max(1, spec.workers)
        skip_batches = len(range(worker, spec.start_batch, own))
        for _ in range(skip_batches * spec.plan.batch_size):   # resume: no decoding
            next(stream)
        decoder = SampleDecoder(spec, errors)
        yield from _batches(stream, decoder, valid_end, quota - skip_batches * spec.plan.batch_size,
                            spec, errors)


def _chain(a, b):
    yield from a
    yield from b


def _batches(stream, decoder, valid_end, n_good: int, spec: _Spec, errors: _Errors) -> Iterator[dict]:
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
            out = collate(batch, spec.cfg, spec.n_features)
            out["_skipped"] = errors.take()
            yield out
            batch = []


class _RangeReader:
    """Reads positions of the epoch sequence G_e (modulo N), joining soft-label shards by key."""

    def __init__(self, spec: _Spec, errors: _Errors):
        self.spec, self.errors = spec, errors
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
            i = bisect.bisect_right(self.starts, local) - 1
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
        path = self.spec.shards[k][0]
        samples = iter_samples(path, self.errors)
        soft = None
        if self.spec.soft_shards is not None:
            soft_path = self.spec.soft_shards[k]
            soft = iter_samples(soft_path, _soft_raise(soft_path), allowed=is_soft_ext)
        for i, sample in enumerate(samples):
            if i >= offset + take:
                return
            if soft is not None:  # checked for skipped samples too: misalignment is always an error
                _join_soft(sample, soft, self.spec.soft_shards[k], i)
            if i >= offset:
                sample["__shard__"] = Path(path).name
                yield sample


def _soft_raise(path: str):
    def fail(reason: str, detail: str) -> None:
        raise SoftLabelError(f"soft-label shard {path}: {reason}: {detail}")
    return fail


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


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------

def _world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardLoader:
    """Iterable over one epoch of batches of one split; the same ``len()`` on every rank.

    ``set_epoch(e)`` before each epoch (like DistributedSampler). ``skipped`` counts the
    samples skipped in the current/last epoch by reason (corrupt, incomplete, truncated shard).
    ``state_dict()``/``load_state_dict()`` give exact mid-epoch resume with the same world size,
    workers, batch size and seed.
    """

    def __init__(self, shard_dir, split: str, cfg: LoaderConfig, *, train: bool, rank: Optional[int] = None,
                 world_size: Optional[int] = None, epoch: int = 0, soft_dir=None):
        self.shard_dir, self.split, self.cfg, self.train = Path(shard_dir), split, cfg, train
        self.rank, self.world_size = _world(rank, world_size)
        self.index = read_index(self.shard_dir, split)
        self.shards = [(str(self.shard_dir / split / s["name"]), int(s["count"])) for s in self.index["shards"]]
        self.soft_shards = _soft_shards(soft_dir, split, self.index) if soft_dir is not None else None
        self.plan = EpochPlan.make(self.index["num_samples"], self.world_size, cfg.num_workers, cfg.batch_size,
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
        mismatch = {k: (state.get(k), v) for k, v in self._geometry().items() if state.get(k) != v}
        if mismatch:
            raise ValueError(f"loader state is from another geometry {mismatch} (saved, now): the sample "
                             f"order differs; resume with the same world size, workers, batch size and seed")
        self.epoch, self._start_batch = int(state["epoch"]), int(state["batch"])

    def _geometry(self) -> dict:
        return {"world_size": self.world_size, "num_workers": self.cfg.num_workers,
                "batch_size": self.cfg.batch_size, "seed": self.cfg.seed,
                "num_samples": self.plan.num_samples, "train": self.train}

    def _spec(self, start_batch: int) -> _Spec:
        return _Spec(self.shards, self.soft_shards, self.plan, self.cfg, self.train, self.epoch, self.rank,
                     self.cfg.num_workers, start_batch, len(self.index["label_names"]), self.n_features,
                     self.normalizer)

    def __iter__(self) -> Iterator[dict]:
        import torch.utils.data
        import webdataset as wds

        if "image" in self.cfg.modalities:
            import torchvision.transforms  # noqa: F401  -- once here, not in every forked worker
        start, self._start_batch = self._start_batch, 0
        self.position, self.skipped = start, Counter()
        kwargs = {"prefetch_factor": self.cfg.prefetch_factor} if self.cfg.num_workers > 0 else {}
        loader = torch.utils.data.DataLoader(wds.DataPipeline(_SlotPipeline(self._spec(start))), batch_size=None,
                                             num_workers=self.cfg.num_workers, pin_memory=self.cfg.pin_memory,
                                             **kwargs)
        for batch in loader:
            self.skipped.update(batch.pop("_skipped"))
            self.position += 1
            yield batch
        if self.skipped:
            log.warning("%s epoch %d rank %d: skipped %d samples (%s)", self.split, self.epoch, self.rank,
                        self.num_skipped, ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())))


def _soft_shards(soft_dir, split: str, index: dict) -> list[str]:
    paths = [Path(soft_dir) / split / s["name"] for s in index["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SoftLabelError(f"soft-label shards missing for split {split!r}: {missing[:3]}"
                             + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return [str(p) for p in paths]


def build_loader(shard_dir, split: str, cfg: LoaderConfig, *, train: bool, rank: Optional[int] = None,
                 world_size: Optional[int] = None, epoch: int = 0, soft_dir=None) -> ShardLoader:
    """The loader of ``<shard_dir>/<split>``. rank/world_size default to torch.distributed (if
    initialised), else $RANK/$WORLD_SIZE, else 0/1. ``soft_dir`` joins an aligned soft-label
    shard set (same split folders, shard names and keys in the same order)."""
    return ShardLoader(shard_dir, split, cfg, train=train, rank=rank, world_size=world_size, epoch=epoch,
                       soft_dir=soft_dir)
