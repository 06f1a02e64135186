"""The teacher pass: every teacher, once, over every split's data shards -> aligned soft labels.

Distributed over ranks (``torchrun`` locally, SLURM tasks on a cluster): the data shards of all
splits, in a fixed order, are dealt round-robin, so rank r owns shards r, r+W, r+2W, ... --
whole shards, deterministically. Per data shard one soft-label shard is written atomically
(kdscale.data.softlabel_format); a re-run skips shards whose soft labels are current (same data
shard hash, same teachers), so a killed pass resumes where it stopped. Rank 0 writes
``index.json`` once every rank is done.

DataLoader workers read and decode whole shards while the main process runs the teachers (I/O
overlapped with compute). Teachers are in eval() under inference_mode; each teacher sees only
the samples that have its modality; a sample that cannot be decoded gets ``seen = False`` for
every teacher (counted and logged), so the soft shard still holds every key of the data shard.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.utils.data

from kdscale import __version__
from kdscale.config import config_hash
from kdscale.data.ingest import DataError
from kdscale.data.record import SPLITS
from kdscale.data.shard_index import read_index
from kdscale.data.shards import shards_out_dir
from kdscale.data.softlabel_format import (FORMAT, SoftShard, read_soft_shard, soft_shard_is_current,
                                           teachers_fingerprint, write_soft_shard)
from kdscale.data.tario import iter_samples, sha256_file
from kdscale.data.transforms import SampleDecoder, collate, subset_batch
from kdscale.distill.ensemble import combine, ensemble_weights
from kdscale.distill.teachers import load_teacher, teachers_dir
from kdscale.engine.distributed import all_gather_objects, barrier, detect_world, init_distributed
from kdscale.engine.trainer import to_device
from kdscale.io.atomic import write_json_atomic
from kdscale.progress import progress_bar

log = logging.getLogger(__name__)


def softlabels_dir(cfg) -> Path:
    return Path(cfg.softlabels.out_dir or Path(cfg.run.out_dir) / "softlabels")


# ---------------------------------------------------------------------------------------------
# Teachers and their combination
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadedTeachers:
    models: list            # in index order
    infos: list[dict]       # name, modality, checkpoint, checkpoint_sha256, val_auroc_macro, ...
    ensembles: list[dict]   # name, members, weights {name: w}, rule, space
    label_names: list[str]

    @property
    def modalities(self) -> list[str]:
        return sorted({i["modality"] for i in self.infos})

    @property
    def fingerprint(self) -> str:
        return teachers_fingerprint(self.infos, self.ensembles)


def load_teachers(cfg) -> LoadedTeachers:
    models, infos, label_names = [], [], None
    for teacher in cfg.teachers.task_members():   # data radiology teachers are pretraining steps
        folder = teachers_dir(cfg) / teacher.name
        info_path = folder / "teacher.json"
        if not info_path.is_file():
            raise DataError(f"teacher {teacher.name!r} is not trained (run `kdscale teachers --only "
                            f"{teacher.name}`)", file=info_path)
        info = json.loads(info_path.read_text())
        sha = sha256_file(folder / "teacher.pt")
        if sha != info["checkpoint_sha256"]:
            raise DataError(f"teacher {teacher.name!r}: teacher.pt does not match teacher.json's sha256 "
                            f"(partially overwritten?); retrain it", file=folder / "teacher.pt")
        model, loaded = load_teacher(folder / "teacher.pt")
        if label_names is not None and loaded["label_names"] != label_names:
            raise DataError(f"teacher {teacher.name!r} predicts {loaded['label_names']}, teacher "
                            f"{cfg.teachers.task_members()[0].name!r} {label_names}: one pass needs one label set",
                            file=folder / "teacher.pt")
        label_names = loaded["label_names"]
        models.append(model)
        infos.append({**{k: info.get(k) for k in ("name", "modality", "arch", "val_auroc_macro", "parameters")},
                      "checkpoint": str((folder / "teacher.pt").resolve()), "checkpoint_sha256": sha})
    val_auroc = {i["name"]: i["val_auroc_macro"] for i in infos}
    ensembles = []
    for ens in cfg.teachers.resolved_ensembles():
        weights = ensemble_weights(ens.rule, ens.members, fixed=ens.weights or None,
                                   val_auroc={m: val_auroc[m] for m in ens.members})
        ensembles.append({"name": ens.name, "members": list(ens.members), "rule": ens.rule, "space": ens.space,
                          "weights": {m: float(weights[m]) for m in ens.members}})
    return LoadedTeachers(models, infos, ensembles, label_names)


# ---------------------------------------------------------------------------------------------
# Reading whole shards in workers
# ---------------------------------------------------------------------------------------------

@dataclass
class _ShardJob:
    split: str
    name: str
    path: str
    sha256: str
    count: int


class _DecodeSpec:
    """What SampleDecoder needs (eval transform; EHR normalizer of the data index)."""

    def __init__(self, loader_cfg, index: dict):
        ehr = index.get("ehr") or {}
        self.cfg, self.train, self.epoch = loader_cfg, False, 0
        self.n_labels, self.n_features = len(index["label_names"]), int(ehr.get("num_features") or 0)
        self.normalizer = ehr.get("normalizer")


class _ShardStream(torch.utils.data.IterableDataset):
    """An iterable over (job index, keys, decoded-ok flags, batch) chunks of whole shards; in
    DataLoader worker w it reads the jobs w, w+workers, ... (each shard by exactly one worker)."""

    def __init__(self, jobs: list[_ShardJob], specs: dict, batch_size: int):
        super().__init__()
        self.jobs, self.specs, self.batch_size = jobs, specs, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j in range(worker, len(self.jobs), workers):
            job, spec = self.jobs[j], self.specs[self.jobs[j].split]
            errors: list[str] = []
            decoder = SampleDecoder(spec, lambda reason, detail: errors.append(reason))
            keys, ok, good = [], [], []
            for position, raw in enumerate(iter_samples(job.path, lambda r, d: errors.append(r))):
                raw["__pos__"], raw["__shard__"] = position, job.name
                sample = decoder(raw)
                keys.append(raw["__key__"])
                ok.append(sample is not None)
                if sample is not None:
                    sample["valid"] = True
                    good.append(sample)
                if len(good) == self.batch_size:
                    yield {"job": j, "keys": keys, "ok": ok, "batch": collate(good, spec.cfg, spec.n_features),
                           "last": False, "errors": []}
                    keys, ok, good = [], [], []
            yield {"job": j, "keys": keys, "ok": ok,
                   "batch": collate(good, spec.cfg, spec.n_features) if good else None, "last": True,
                   "errors": errors}


def _identity(x):
    return x


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

def run_teachers(teachers: LoadedTeachers, batch: dict, device, precision: str = "fp32"):
    """-> (logits [B, K, C] float32 with zeros where unseen, seen [B, K] bool)."""
    b, k, c = len(batch["key"]), len(teachers.models), len(teachers.label_names)
    logits = torch.zeros(b, k, c)
    seen = torch.zeros(b, k, dtype=torch.bool)
    batch = to_device(batch, device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), autocast:
        for t, (model, info) in enumerate(zip(teachers.models, teachers.infos)):
            present = batch["present"][info["modality"]].cpu()
            if not present.any():
                continue
            idx = present.nonzero().squeeze(1)
            sub = batch if bool(present.all()) else subset_batch(batch, idx)
            logits[idx, t] = model(sub).float().cpu()
            seen[idx, t] = True
    return logits, seen


def combine_ensembles(teachers: LoadedTeachers, logits, seen, task: str = "multilabel"):
    """-> (ensemble logits [B, G, C], ensemble_seen [B, G])."""
    names = [i["name"] for i in teachers.infos]
    out, has = [], []
    for ens in teachers.ensembles:
        cols = [names.index(m) for m in ens["members"]]
        combined, any_seen = combine({m: logits[:, c] for m, c in zip(ens["members"], cols)},
                                     {m: seen[:, c] for m, c in zip(ens["members"], cols)},
                                     ens["weights"], space=ens["space"], temperature=1.0, task=task)
        out.append(torch.where(any_seen[:, None], combined, torch.zeros_like(combined)))
        has.append(any_seen)
    return torch.stack(out, 1), torch.stack(has, 1)


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------

def _jobs(data_dir: Path, splits: list[str]) -> tuple[list[_ShardJob], dict]:
    jobs, indexes = [], {}
    for split in splits:
        if not (data_dir / split).is_dir():
            continue
        index = read_index(data_dir, split)
        indexes[split] = index
        jobs += [_ShardJob(split, e["name"], str(data_dir / split / e["name"]), e["sha256"], int(e["count"]))
                 for e in index["shards"]]
    if not jobs:
        raise DataError(f"no data shards under {data_dir} for splits {splits}", file=data_dir)
    return jobs, indexes


def teacher_pass(cfg, *, device: Optional[str] = None, progress: bool = True) -> dict:
    """Run the pass on this rank (world from torchrun/SLURM env); rank 0 writes index.json."""
    world = detect_world()
    init_distributed(world)
    started = time.time()
    data_dir, out = shards_out_dir(cfg), softlabels_dir(cfg)
    sl = cfg.softlabels
    jobs, indexes = _jobs(data_dir, sl.splits)
    teachers = load_teachers(cfg)
    first = next(iter(indexes.values()))
    if first["label_names"] != teachers.label_names:
        raise DataError(f"teachers were trained on labels {teachers.label_names}, the shards have "
                        f"{first['label_names']}", file=data_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    for model in teachers.models:
        model.to(dev).eval()
    fingerprint = teachers.fingerprint
    mine = [j for i, j in enumerate(jobs) if i % world.world_size == world.rank]
    todo = [j for j in mine if not soft_shard_is_current(out / j.split / j.name, {"sha256": j.sha256}, fingerprint)]
    for split in {j.split for j in todo}:
        (out / split).mkdir(parents=True, exist_ok=True)
    loader_cfg = dataclasses.replace(cfg.loader, modalities=teachers.modalities, require=[],
                                     batch_size=sl.batch_size)
    specs = {split: _DecodeSpec(loader_cfg, index) for split, index in indexes.items()}
    # Auto workers: on a GPU, decoding workers overlap I/O with the forward; on CPU they compete
    # with it for the same cores (bench/bench_teacher_pass.py: 0.90 of the raw forward rate with
    # inline decoding vs 0.56 with one worker on 2 cores), so decode inline there.
    workers = sl.num_workers if sl.num_workers >= 0 else (2 if dev.type == "cuda" else 0)
    sl = dataclasses.replace(sl, num_workers=workers)
    threads = torch.get_num_threads()
    if dev.type == "cpu" and sl.num_workers > 0 and todo:
        # On CPU the decoding workers and the forward share the cores: OpenMP threads that spin
        # while a worker holds their core slow convolutions several-fold. Leave them their cores.
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - sl.num_workers)))
    try:
        stats = _run_jobs(todo, specs, teachers, dev, sl, fingerprint, out, cfg.teachers.task,
                          progress and world.is_main)
    finally:
        torch.set_num_threads(threads)
    stats["skipped_current"] = len(mine) - len(todo)
    all_stats = all_gather_objects(stats)
    barrier()
    summary = {}
    if world.is_main:
        summary = write_index(out, data_dir, indexes, teachers, cfg, all_stats)
        summary["seconds"] = round(time.time() - started, 2)
        print(f"soft labels: {summary['num_samples']} samples in {summary['num_shards']} shards "
              f"({summary['written_now']} written now, {summary['already_current']} already current), "
              f"{summary['undecodable_samples']} undecodable -> {out}")
    barrier()
    return summary


def _run_jobs(todo, specs, teachers, dev, sl, fingerprint, out: Path, task: str, show: bool) -> dict:
    stats = {"written": 0, "samples": 0, "undecodable": 0, "forward_s": 0.0, "write_s": 0.0, "wall_s": 0.0}
    if not todo:
        return stats
    stream = _ShardStream(todo, specs, sl.batch_size)
    kwargs = {"prefetch_factor": 4} if sl.num_workers > 0 else {}
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=min(sl.num_workers, len(todo)),
                                         collate_fn=_identity, **kwargs)
    pending: dict[int, dict] = {}
    bar = progress_bar("teacher pass", unit="sample", total=sum(j.count for j in todo), requested=show)
    stop_after = int(os.environ.get("KDSCALE_FAULT_KILL_AFTER_SHARDS", "0"))  # tests: SIGKILL mid-pass
    wall = time.perf_counter()
    for chunk in loader:
        acc = pending.setdefault(chunk["job"], {"keys": [], "ok": [], "logits": [], "seen": []})
        acc["keys"] += chunk["keys"]
        acc["ok"] += chunk["ok"]
        if chunk["batch"] is not None:
            tick = time.perf_counter()
            logits, seen = run_teachers(teachers, chunk["batch"], dev, sl.precision)
            stats["forward_s"] += time.perf_counter() - tick
            acc["logits"].append(logits)
            acc["seen"].append(seen)
        bar.update(len(chunk["keys"]))
        if chunk["last"]:
            tick = time.perf_counter()
            job = todo[chunk["job"]]
            n_bad = _write_job(job, pending.pop(chunk["job"]), teachers, fingerprint, out, task)
            stats["write_s"] += time.perf_counter() - tick
            stats["written"] += 1
            stats["samples"] += job.count
            stats["undecodable"] += n_bad
            if chunk["errors"]:
                log.warning("%s/%s: %d sample(s) could not be decoded (%s): their soft labels say seen=False",
                            job.split, job.name, n_bad, ", ".join(sorted(set(chunk["errors"]))))
            if stop_after and stats["written"] >= stop_after:
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    stats["wall_s"] = time.perf_counter() - wall
    return stats


def _write_job(job: _ShardJob, acc: dict, teachers: LoadedTeachers, fingerprint: str, out: Path, task: str) -> int:
    n, k, c = len(acc["keys"]), len(teachers.models), len(teachers.label_names)
    if n != job.count:
        raise DataError(f"read {n} samples from {job.split}/{job.name}, its index says {job.count}: the data "
                        f"shard is damaged (run `kdscale verify`)", file=job.path)
    ok = torch.tensor(acc["ok"], dtype=torch.bool)
    logits = torch.zeros(n, k, c)
    seen = torch.zeros(n, k, dtype=torch.bool)
    if acc["logits"]:
        logits[ok] = torch.cat(acc["logits"])
        seen[ok] = torch.cat(acc["seen"])
    ensemble, ensemble_seen = combine_ensembles(teachers, logits, seen, task)
    meta = {"format": FORMAT, "split": job.split, "data_shard": job.name, "data_sha256": job.sha256,
            "count": n, "teachers": fingerprint}
    write_soft_shard(out / job.split / job.name,
                     SoftShard(meta, acc["keys"], logits.numpy().astype(np.float16), seen.numpy(),
                               ensemble.numpy().astype(np.float16), ensemble_seen.numpy()))
    return int((~ok).sum())


def write_index(out: Path, data_dir: Path, indexes: dict, teachers: LoadedTeachers, cfg, all_stats: list) -> dict:
    """index.json from the soft shards on disk (so shards written by earlier, killed runs count)."""
    splits, total, shards, bad = {}, 0, 0, 0
    for split, index in indexes.items():
        entries = []
        for e in index["shards"]:
            path = out / split / e["name"]
            soft = read_soft_shard(path)
            if soft.meta["data_sha256"] != e["sha256"] or soft.meta["teachers"] != teachers.fingerprint:
                raise DataError("soft-label shard is stale after the pass (another pass running concurrently?)",
                                file=path)
            undecodable = int((~soft.seen.any(1)).sum())
            entries.append({"name": e["name"], "count": len(soft), "data_sha256": e["sha256"],
                            "sha256": sha256_file(path), "bytes": path.stat().st_size,
                            "unseen_samples": undecodable})
            total, shards = total + len(soft), shards + 1
        splits[split] = {"num_samples": sum(x["count"] for x in entries), "shards": entries}
    written = sum(s["written"] for s in all_stats)
    bad = sum(s["undecodable"] for s in all_stats)
    index = {"format": FORMAT, "kdscale_version": __version__, "data_dir": str(data_dir.resolve()),
             "config_hash": config_hash(cfg), "label_names": teachers.label_names,
             "teachers": teachers.infos, "ensembles": teachers.ensembles, "fingerprint": teachers.fingerprint,
             "logits": {"dtype": "float16", "temperature": 1.0,
                        "note": "raw teacher logits; the distillation temperature is applied at training time"},
             "ensemble_names": [e["name"] for e in teachers.ensembles],
             "teacher_names": [i["name"] for i in teachers.infos], "splits": splits,
             "pass": {"ranks": len(all_stats), "written_now": written, "undecodable_samples": bad,
                      "forward_s": round(sum(s["forward_s"] for s in all_stats), 3),
                      "wall_s": round(max(s["wall_s"] for s in all_stats), 3)}}
    write_json_atomic(out / "index.json", index)
    return {"num_samples": total, "num_shards": shards, "written_now": written,
            "already_current": shards - written, "undecodable_samples": bad, "out_dir": str(out)}
