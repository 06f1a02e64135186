#!/usr/bin/env python
"""Shard benchmark: read throughput (shard loader vs a per-file MedFuse-style dataset vs pure
decode+transform of in-memory bytes) and write throughput + peak RSS of the shard writer.

    python bench/bench_shards.py                          # demo source (default), ~1.5 min on 2 cores
    python bench/bench_shards.py --source synthetic       # synthetic 512x512 JPEGs, numeric EHR CSVs
    python bench/bench_shards.py --demo-n 3000 --epochs 7 --write-sizes 1000,10000,50000

Read, ``--source demo`` (default): generates (or reuses) the MIMIC demo tree
(``kdscale.data.sources.demo.generate``), builds shards from it with ``build_shards`` and
configs/data/demo_mimic.yaml (phenotyping, partial cohort; CXRs stored resized to shorter side
256), then reads the train split
(a) through the shard loader (``build_loader``: image + EHR, MedFuse train transform),
(b) through ``MedFuseDataset``, which does what MedFuse's ``__getitem__`` does per sample: open
the CXR JPEG with PIL + ``.convert("RGB")`` + MedFuse's torchvision transform (ToTensor,
Normalize), read the stay's raw ``episodeN_timeseries.csv``, discretize it (76 features) and
normalize it with a normalizer fitted once at setup; MedFuse's own DataLoader (shuffle, same
batch size and worker count, persistent workers),
(c) the same per-file dataset with the shard loader's image decode path (grayscale kept in one
channel; identical tensors): what is left of the gap is the file format, not the image code.
Both sides decode the same JPEG bytes: a source JPEG that the shard build resizes is given to
the per-file reader pre-resized the same way (MedFuse's resize.py step); the demo's 256x320
films are already at the target and are stored unchanged.

Timing: each reader is built once; its first epoch (worker start-up, imports) is reported on its
own, then ``--epochs`` epochs per reader, interleaved, give the steady figure (median); then one
cold-cache epoch per reader, after its files are evicted from the page cache (``--no-cold``
skips it). ``--source synthetic``: 512x512 JPEGs (stored / pre-resized to 256x256) and
pre-discretized numeric EHR CSVs.

Write: samples/s, MB/s and peak RSS of ``build_shards`` at ``--write-sizes``, always from the
synthetic source without resizing (generating a 10k-stay demo tree takes ~80 s on 2 cores,
longer than the benchmark budget; the synthetic source costs ~nothing, so the writer is what is
measured).

Prints a table and saves bench/results/shards.json.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
N_LABELS, N_FEATURES = 25, 76


def cxr_jpeg(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = 60 + 80 * np.exp(-((x - width / 2) ** 2) / (2 * (width / 4) ** 2))
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, width / 6)
        img += 60 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r ** 2))
    img += rng.normal(0, 4, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class BenchSource:
    name = "bench"
    label_names = [f"label{i}" for i in range(N_LABELS)]

    def __init__(self, n: int, width: int, height: int, pool: int = 64):
        self.n = n
        self.images = [cxr_jpeg(width, height, i) for i in range(pool)]
        self.size = (width, height)

    def describe(self) -> dict:
        return {"name": self.name, "label_names": self.label_names,
                "ehr_feature_names": [f"f{i}" for i in range(N_FEATURES)]}

    def record(self, i: int):
        from kdscale.data.record import Record

        rng = np.random.default_rng(i)
        patient = i // 3
        return Record(key=f"s{i:07d}", patient_id=f"p{patient}",
                      split=("train", "train", "train", "val", "test")[patient % 5],
                      labels=rng.integers(0, 2, N_LABELS).astype(np.float32),
                      image=self.images[i % len(self.images)], image_size=self.size,
                      ehr=rng.normal(0, 1, (24 + i % 48, N_FEATURES)).astype(np.float32),
                      report=f"Report {i}: no acute cardiopulmonary process.")

    def records(self, log):
        for i in range(self.n):
            log.count_read()
            log.keep()
            yield self.record(i)


def _cfg(out: Path, per_shard: int, *overrides: str):
    from kdscale.schema import load_config

    return load_config(None, [f"run.out_dir={out}", f"shards.max_samples_per_shard={per_shard}", *overrides])


# ---------------------------------------------------------------------------------------------
# Write: run in a child process so ru_maxrss is the writer's own peak
# ---------------------------------------------------------------------------------------------

def _peak_rss_mb() -> float:
    """This process's peak RSS. /proc VmHWM restarts at exec; ru_maxrss would still hold the
    parent's peak from before the fork+exec (Linux), so it is only the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_child(n: int, out: str, width: int, height: int, workers: int) -> None:
    from kdscale.data.shards import build_shards

    source = BenchSource(n, width, height)
    cfg = _cfg(Path(out), 1000)      # config loading (and what it imports) is not the writer's cost
    base_rss = _peak_rss_mb()
    start = time.perf_counter()
    summary = build_shards(cfg, workers=workers, source=source)
    elapsed = time.perf_counter() - start
    size = sum(p.stat().st_size for p in Path(out, "shards").glob("*/*.tar"))
    peak = _peak_rss_mb()
    print(json.dumps({"samples": summary["written"], "seconds": elapsed, "samples_per_s": n / elapsed,
                      "mb_per_s": size / elapsed / 1e6, "shard_bytes": size,
                      "peak_rss_mb": peak, "peak_rss_before_build_mb": base_rss,
                      "peak_rss_growth_during_build_mb": peak - base_rss,
                      "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def bench_write(sizes: list[int], width: int, height: int, workers: int) -> list[dict]:
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="kdscale-bench-") as tmp:
            cmd = [sys.executable, __file__, "--_write-child", str(n), tmp, "--image-width", str(width),
                   "--image-height", str(height), "--write-workers", str(workers)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append({"n": n, "workers": workers, **json.loads(proc.stdout.strip().splitlines()[-1])})
        row = results[-1]
        print(f"write {n:>7} samples: {row['samples_per_s']:8.0f} samples/s {row['mb_per_s']:7.1f} MB/s  peak RSS "
              f"{row['peak_rss_mb']:.0f} MB ({row['peak_rss_growth_during_build_mb']:+.0f} MB during the build)",
              flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Read: shared pieces
# ---------------------------------------------------------------------------------------------

# MedFuse's stored-image preprocessing as the shard build does it by default for CXRs
# (configs/data/*mimic*.yaml): shorter side resized to 256, JPEG re-encoded at quality 90.
RESIZE = ["shards.image_resize=shorter", "shards.image_resize_to=256"]


def medfuse_transform(cfg, train: bool):
    """MedFuse's torchvision pipeline, verbatim (ToTensor + Normalize on an RGB image), with the
    sizes and augmentation of ``cfg`` (a LoaderConfig)."""
    from torchvision import transforms as T

    steps = [T.Resize(cfg.resize_size)]
    if train:
        steps += [T.RandomHorizontalFlip(),
                  T.RandomAffine(degrees=cfg.affine_degrees, shear=0,
                                 translate=(cfg.affine_translate, cfg.affine_translate),
                                 scale=tuple(cfg.affine_scale))]
    steps += [T.CenterCrop(cfg.image_size), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(steps)


def open_image(path, fast: bool):
    """MedFuse: ``Image.open(path).convert("RGB")``. ``fast``: the shard loader's decode path on the
    same file (grayscale kept in one channel: same tensors after the loader's transform)."""
    from PIL import Image

    from kdscale.data.transforms import decode_for_transform

    if fast:
        return decode_for_transform(Path(path).read_bytes())
    with Image.open(path) as img:
        return img.convert("RGB")


def _epoch(iterable, count) -> tuple[int, float]:
    start = time.perf_counter()
    n = sum(count(batch) for batch in iterable)
    return n, time.perf_counter() - start


def evict(files) -> int:
    """Drop these files' pages from the page cache (posix_fadvise DONTNEED: no root needed, other
    files untouched) -> bytes evicted. The next read comes from the disk (or the host's cache on
    a VM: "cold" here means the guest's page cache)."""
    total = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def measure(readers: dict, epochs: int, cold: bool) -> dict:
    """Each reader: ``(run_epoch(epoch) -> iterable of batches, count(batch) -> samples, files)``,
    built once (persistent workers). Epoch 0 is timed on its own (it includes worker start-up and
    first imports); then ``epochs`` further epochs per reader, interleaved round-robin so that
    load from other processes on the machine hits every reader alike: steady = their median.
    ``cold``: one more epoch per reader right after evicting its files from the page cache."""
    out = {}
    for name, (run, count, _) in readers.items():
        n, seconds = _epoch(run(0), count)
        out[name] = {"first_epoch": n / seconds, "epochs": []}
    for e in range(1, epochs + 1):
        names = list(readers)
        names = names[e % len(names):] + names[:e % len(names)]  # rotate who goes first
        for name in names:
            run, count, _ = readers[name]
            n, seconds = _epoch(run(e), count)
            out[name]["epochs"].append(n / seconds)
    for name, (run, count, files) in readers.items():
        if cold:
            evict(files)
            n, seconds = _epoch(run(epochs + 1), count)
            out[name]["cold_epoch"] = n / seconds
    for stats in out.values():
        stats["steady_median"] = float(np.median(stats["epochs"]))
        stats["steady_best"] = max(stats["epochs"])
    return out


def _shard_reader(loader):
    def run(epoch):
        loader.set_epoch(epoch)
        return loader
    return run, lambda b: int(b["valid"].sum()), [p for p, _ in loader.shards]


def _torch_reader(dataset, batch: int, workers: int, collate, files: list):
    import torch

    kwargs = {"persistent_workers": True, "prefetch_factor": 2} if workers > 0 else {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=collate, **kwargs)
    return (lambda epoch: loader), (lambda b: b[0].shape[0]), files


def _report(results: dict, workers: list[int], measured: dict, pure: dict) -> None:
    """Fill samples/s and ratios from ``measured[w][reader]``; print one line per worker count."""
    sps, ratio = results["samples_per_s"], {}
    for w in workers:
        m = measured[w]
        for name, stats in m.items():
            sps.setdefault(name, {})[w] = {k: (round(v, 1) if isinstance(v, float) else [round(x, 1) for x in v])
                                           for k, v in stats.items()}
        shard, base = m["shard_loader"]["steady_median"], m["per_file_medfuse"]["steady_median"]
        ratio[w] = shard / base
        # the least favourable pairing of steady epochs: the shard loader's slowest, MedFuse's fastest
        results["ratio_shard_over_per_file_worst_case"][w] = (min(m["shard_loader"]["epochs"])
                                                              / max(m["per_file_medfuse"]["epochs"]))
        results["ratio_shard_over_per_file_first_epoch"][w] = (m["shard_loader"]["first_epoch"]
                                                               / m["per_file_medfuse"]["first_epoch"])
        fast_image = m["per_file_loader_image_path"]["steady_median"]
        results["ratio_shard_over_per_file_loader_image_path"][w] = shard / fast_image
        if "cold_epoch" in m["shard_loader"]:
            results["ratio_shard_over_per_file_cold_epoch"][w] = (m["shard_loader"]["cold_epoch"]
                                                                  / m["per_file_medfuse"]["cold_epoch"])
        results["ratio_shard_over_pure"][w] = {k: shard / v for k, v in pure.items()}
        line = (f"workers {w}: steady (median) shard loader {shard:6.0f}, per-file MedFuse {base:6.0f}, per-file "
                f"with the loader's image path {fast_image:6.0f} samples/s: shard/per-file {ratio[w]:4.2f}x "
                f"(worst pairing {results['ratio_shard_over_per_file_worst_case'][w]:4.2f}x); first "
                f"epoch {m['shard_loader']['first_epoch']:6.0f} vs {m['per_file_medfuse']['first_epoch']:6.0f}")
        if "cold_epoch" in m["shard_loader"]:
            line += f"; cold epoch {m['shard_loader']['cold_epoch']:6.0f} vs {m['per_file_medfuse']['cold_epoch']:6.0f}"
        print(line + "; shard/pure " + ", ".join(f"{k} {shard / v:4.2f}" for k, v in pure.items()), flush=True)
    results["ratio_shard_over_per_file"] = ratio
    results["target_3x_met"] = {w: r >= 3.0 for w, r in ratio.items()}


def _new_results(**fields) -> dict:
    return {**fields, "samples_per_s": {}, "ratio_shard_over_per_file": {}, "ratio_shard_over_per_file_worst_case": {},
            "ratio_shard_over_per_file_first_epoch": {}, "ratio_shard_over_per_file_cold_epoch": {},
            "ratio_shard_over_per_file_loader_image_path": {},
            "ratio_shard_over_pure": {}}


# ---------------------------------------------------------------------------------------------
# Read, synthetic source: per-file tree of JPEGs + pre-discretized numeric EHR CSVs
# ---------------------------------------------------------------------------------------------

class PerFileDataset:
    """A listfile CSV read once; per sample, open the JPEG file and parse the sample's EHR CSV
    (MedFuse reads one ``*_timeseries.csv`` per stay; here already discretized numbers)."""

    def __init__(self, root: Path, transform, fast: bool = False):
        with open(root / "listfile.csv") as fh:
            self.rows = list(csv.DictReader(fh))
        self.root, self.transform, self.fast = root, transform, fast

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        image = self.transform(open_image(self.root / "files" / f"{row['key']}.jpg", self.fast))
        with open(self.root / "ehr" / f"{row['key']}_timeseries.csv") as fh:
            reader = csv.reader(fh)
            next(reader)
            ehr = np.array([[float(v) for v in r] for r in reader], dtype=np.float32)
        labels = np.array([float(v) for v in row["labels"].split()], dtype=np.float32)
        return image, ehr, labels


def per_file_collate(items):
    import torch

    images = torch.stack([it[0] for it in items])
    t = max(it[1].shape[0] for it in items)
    ehr = torch.zeros(len(items), t, N_FEATURES)
    for i, it in enumerate(items):
        ehr[i, :it[1].shape[0]] = torch.from_numpy(it[1])
    return images, ehr, torch.from_numpy(np.stack([it[2] for it in items]))


def write_per_file_tree(source: BenchSource, root: Path, shards_cfg) -> None:
    """The per-file tree, JPEGs pre-resized exactly as the shard build stores them (MedFuse's
    resize.py step), so both readers decode the same bytes."""
    from kdscale.data.shards import encode_image

    (root / "files").mkdir(parents=True)
    (root / "ehr").mkdir()
    resized = {}
    with open(root / "listfile.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["key", "labels"])
        for i in range(source.n):
            rec = source.record(i)
            if id(rec.image) not in resized:
                resized[id(rec.image)] = encode_image(rec.image, shards_cfg)[0]
            (root / "files" / f"{rec.key}.jpg").write_bytes(resized[id(rec.image)])
            with open(root / "ehr" / f"{rec.key}_timeseries.csv", "w", newline="") as eh:
                w = csv.writer(eh)
                w.writerow([f"f{j}" for j in range(N_FEATURES)])
                w.writerows(rec.ehr.tolist())
            out.writerow([rec.key, " ".join(str(int(v)) for v in rec.labels)])


def bench_read(n: int, width: int, height: int, batch: int, workers: list[int], epochs: int, cold: bool) -> dict:
    from kdscale.data.loader import LoaderConfig, build_loader
    from kdscale.data.shards import build_shards, encode_image
    from kdscale.data.transforms import build_image_transform, decode_for_transform, decode_image

    source = BenchSource(n, width, height)
    with tempfile.TemporaryDirectory(prefix="kdscale-bench-") as tmp:
        tmp = Path(tmp)
        cfg_shards = _cfg(tmp, max(16, n // 16), *RESIZE)
        build_shards(cfg_shards, source=BenchSource(n, width, height))
        write_per_file_tree(source, tmp / "perfile", cfg_shards.shards)
        stored = encode_image(source.images[0], cfg_shards.shards)[2]
        cfg = LoaderConfig(batch_size=batch, drop_last=False, modalities=["image", "ehr"])
        results = _new_results(source="synthetic", n=n, batch_size=batch, epochs_per_measurement=epochs,
                               images={"source": f"{width}x{height} grayscale JPEG",
                                       "stored_and_per_file": f"{stored[0]}x{stored[1]} (shorter side 256, "
                                                              f"JPEG q90: the same bytes on both sides)"})
        images = [encode_image(source.record(i).image, cfg_shards.shards)[0] for i in range(min(n, 256))]
        medfuse, loader_tf = medfuse_transform(cfg, True), build_image_transform(cfg, True)
        pure = {}
        for name, decode, tf in (("medfuse_path", decode_image, medfuse),
                                 ("loader_path", decode_for_transform, loader_tf)):
            start = time.perf_counter()
            for data in images:
                tf(decode(data))
            pure[name] = len(images) / (time.perf_counter() - start)
        results["samples_per_s"]["pure_decode_transform"] = pure
        print("pure decode+transform (1 process): " + ", ".join(f"{k} {v:.0f}/s" for k, v in pure.items()), flush=True)
        measured = {}
        for w in workers:
            cfg.num_workers = w
            files = sorted(str(p) for p in (tmp / "perfile").rglob("*") if p.is_file())
            readers = {
                "shard_loader": _shard_reader(build_loader(tmp / "shards", "train", cfg, train=True, rank=0,
                                                           world_size=1)),
                "per_file_medfuse": _torch_reader(PerFileDataset(tmp / "perfile", medfuse), batch, w,
                                                  per_file_collate, files),
                "per_file_loader_image_path": _torch_reader(PerFileDataset(tmp / "perfile", loader_tf, fast=True),
                                                            batch, w, per_file_collate, files)}
            measured[w] = measure(readers, epochs, cold)
            del readers
        _report(results, workers, measured, pure)
    return results


# ---------------------------------------------------------------------------------------------
# Read, demo source: MedFuse-faithful per-file dataset over the demo MIMIC tree
# ---------------------------------------------------------------------------------------------

DEMO_CONFIG = ROOT / "configs" / "data" / "demo_mimic.yaml"
DEMO_TASK, DEMO_COHORT = "phenotyping", "partial"


class MedFuseDataset:
    """What MedFuse's fusion dataset does per sample, over the demo tree's files.

    Setup (once, like MedFuse reading its listfiles and loading a precomputed normalizer): a list
    of (image path or None, timeseries CSV path, period length, labels). ``__getitem__``: open the
    JPEG with PIL, ``.convert("RGB")``, MedFuse's train transform; read the raw
    ``episodeN_timeseries.csv`` (Hours + 17 channels as strings), Discretizer.transform (76
    features), Normalizer.apply. A stay without a paired image gets a zero image (3 x size x
    size), as in MedFuse. ``fast``: the shard loader's image decode path instead (same tensors).
    """

    def __init__(self, items: list[dict], discretizer, normalizer, transform, image_size: int, fast: bool = False):
        self.items, self.discretizer, self.normalizer = items, discretizer, normalizer
        self.transform, self.image_size, self.fast = transform, image_size, fast

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import torch

        from kdscale.data.ehr import read_timeseries_csv

        item = self.items[i]
        if item["image_file"] is not None:
            image = self.transform(open_image(item["image_file"], self.fast))
        else:
            image = torch.zeros(3, self.image_size, self.image_size)
        events = read_timeseries_csv(item["timeseries_file"], self.discretizer.config.channel_names)
        ehr, _ = self.discretizer.transform(events, item["hours"])
        ehr = self.normalizer.apply(ehr)
        return image, ehr, item["labels"]


def _collate_pairs(items):
    import torch

    images = torch.stack([it[0] for it in items])
    t = max(it[1].shape[0] for it in items)
    ehr = torch.zeros(len(items), t, items[0][1].shape[1])
    for i, it in enumerate(items):
        ehr[i, :it[1].shape[0]] = torch.from_numpy(np.asarray(it[1], dtype=np.float32))
    return images, ehr, torch.from_numpy(np.stack([it[2] for it in items]))


def demo_setup(n: int, seed: int, demo_dir: Path, shard_root: Path, per_shard: int) -> dict:
    """Generate/reuse the demo tree, build its shards (with the config's image resize), collect the
    per-file list of train samples; pre-resize the per-file JPEGs the same way where the resize
    changes them (MedFuse's resize.py step), so both readers decode the same bytes."""
    from kdscale.data.demo.mimic_demo import mimic_config_for_demo
    from kdscale.data.ehr import Normalizer
    from kdscale.data.ingest import IngestLog
    from kdscale.data.shards import _target_size, build_shards, encode_image, npy_bytes
    from kdscale.data.sources.demo import MARKER, generate
    from kdscale.data.sources.mimic import MimicSource
    from kdscale.schema import load_config

    start = time.perf_counter()
    reused = (demo_dir / MARKER).is_file()
    generate(demo_dir, "mimic", n, seed)
    gen_s = time.perf_counter() - start
    cfg = load_config(str(DEMO_CONFIG), [f"run.out_dir={shard_root}", f"data.demo.out_dir={demo_dir}",
                                         f"data.demo.n={n}", f"data.demo.seed={seed}",
                                         f"data.demo.task={DEMO_TASK}", f"data.demo.cohort={DEMO_COHORT}",
                                         f"shards.max_samples_per_shard={per_shard}"])
    start = time.perf_counter()
    summary = build_shards(cfg)
    build_s = time.perf_counter() - start
    shard_dir = Path(cfg.shards.out_dir) if cfg.shards.out_dir else shard_root / "shards"
    index = json.loads((shard_dir / "train" / "index.json").read_text())

    # One metadata pass over the same reader the shards came from: the train keys' file paths.
    source = MimicSource(mimic_config_for_demo(demo_dir, DEMO_TASK, DEMO_COHORT))
    normalizer = Normalizer(source.discretizer.feature_names)
    items, memory, sizes, resized = [], [], set(), 0
    (shard_root / "resized").mkdir()
    for rec in source.records(IngestLog(source="bench")):
        if rec.split != "train":
            continue
        normalizer.update(rec.ehr)
        image_file, image = rec.meta.get("image_file"), rec.image
        if image is not None:
            sizes.add(tuple(rec.image_size))
            if _target_size(tuple(rec.image_size), cfg.shards) != tuple(rec.image_size):
                image = encode_image(rec.image, cfg.shards)[0]
                image_file = shard_root / "resized" / f"{rec.key}.jpg"   # flat, as resize.py writes
                image_file.write_bytes(image)
                resized += 1
        items.append({"key": rec.key, "image_file": image_file,
                      "timeseries_file": rec.meta["timeseries_file"], "hours": float(rec.meta["ehr_hours"]),
                      "labels": np.asarray(rec.labels, dtype=np.float32)})
        memory.append((image, npy_bytes(np.asarray(rec.ehr, dtype=np.float32))))
    normalizer.finalize()
    if len(items) != index["num_samples"]:
        raise RuntimeError(f"per-file list has {len(items)} train samples, shards {index['num_samples']}")
    images = {"source_sizes": sorted(f"{w}x{h}" for w, h in sizes),
              "shards_image_resize": f"{cfg.shards.image_resize} {cfg.shards.image_resize_to}",
              "resized_by_the_setting": resized,
              "per_file_reads": ("pre-resized copies (same bytes as the shards)" if resized else
                                 "the tree's own JPEGs: already at the target size, so the shards store "
                                 "the same bytes unchanged")}
    return {"items": items, "memory": memory, "discretizer": source.discretizer, "normalizer": normalizer,
            "shard_dir": shard_dir, "index": index, "generate_s": gen_s, "build_s": build_s, "images": images,
            "build_summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))},
            "demo_dir": str(demo_dir), "demo_reused": reused}


def pure_decode(memory: list, decode, transform, normalizer) -> float:
    """Samples/s of decode+transform of in-memory image bytes + npy EHR decode + normalize."""
    start = time.perf_counter()
    for image, ehr in memory:
        if image is not None:
            transform(decode(image))
        normalizer.apply(np.load(io.BytesIO(ehr), allow_pickle=False))
    return len(memory) / (time.perf_counter() - start)


def bench_read_demo(n: int, seed: int, demo_dir: Path, batch: int, workers: list[int], epochs: int,
                    cold: bool) -> dict:
    from kdscale.data.loader import LoaderConfig, build_loader
    from kdscale.data.transforms import build_image_transform, decode_for_transform, decode_image

    with tempfile.TemporaryDirectory(prefix="kdscale-bench-") as tmp:
        tmp = Path(tmp)
        setup = demo_setup(n, seed, demo_dir, tmp, per_shard=max(16, n // 16))
        items = setup["items"]
        paired = sum(it["image_file"] is not None for it in items)
        cfg = LoaderConfig(batch_size=batch, drop_last=False, modalities=["image", "ehr"])
        medfuse, loader_tf = medfuse_transform(cfg, True), build_image_transform(cfg, True)
        results = _new_results(source="demo", demo_n=n, demo_seed=seed, task=DEMO_TASK, cohort=DEMO_COHORT,
                               demo_dir=setup["demo_dir"], demo_generate_s=round(setup["generate_s"], 2),
                               shard_build_s=round(setup["build_s"], 2), train_samples=len(items),
                               train_samples_with_image=paired, shards=len(setup["index"]["shards"]),
                               images=setup["images"], batch_size=batch, epochs_per_measurement=epochs)
        print(f"demo tree n={n}: {len(items)} train stays ({paired} with an image), "
              f"{len(setup['index']['shards'])} shards; generate {setup['generate_s']:.1f} s, "
              f"build {setup['build_s']:.1f} s; images {setup['images']}", flush=True)
        pure = {"medfuse_path": pure_decode(setup["memory"], decode_image, medfuse, setup["normalizer"]),
                "loader_path": pure_decode(setup["memory"], decode_for_transform, loader_tf, setup["normalizer"])}
        results["samples_per_s"]["pure_decode_transform"] = pure
        print("pure decode+transform+EHR decode (1 process, in memory): "
              + ", ".join(f"{k} {v:.0f}/s" for k, v in pure.items()), flush=True)
        args = (items, setup["discretizer"], setup["normalizer"])
        files = sorted({str(it[k]) for it in items for k in ("image_file", "timeseries_file") if it[k] is not None})
        measured = {}
        for w in workers:
            cfg.num_workers = w
            readers = {
                "shard_loader": _shard_reader(build_loader(setup["shard_dir"], "train", cfg, train=True, rank=0,
                                                           world_size=1)),
                "per_file_medfuse": _torch_reader(MedFuseDataset(*args, medfuse, cfg.image_size), batch, w,
                                                  _collate_pairs, files),
                "per_file_loader_image_path": _torch_reader(
                    MedFuseDataset(*args, loader_tf, cfg.image_size, fast=True), batch, w, _collate_pairs, files)}
            measured[w] = measure(readers, epochs, cold)
            del readers
        _report(results, workers, measured, pure)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["demo", "synthetic"], default="demo",
                        help="read benchmark data: the generated MIMIC demo tree (MedFuse-faithful per-file "
                             "reader) or the older synthetic tree")
    parser.add_argument("--demo-n", type=int, default=1000, help="demo ICU stays (all splits)")
    parser.add_argument("--demo-seed", type=int, default=0)
    parser.add_argument("--demo-dir", default="", help="demo tree folder (reused when its parameters match); "
                        "default: <tmp>/kdscale-bench-demo-n<N>-s<SEED>")
    parser.add_argument("--epochs", type=int, default=5, help="read: timed epochs per reader after the first "
                        "(which includes worker start-up and is reported apart); the median is the figure")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache epoch (files evicted from "
                        "the page cache with posix_fadvise before one more epoch per reader)")
    parser.add_argument("--n-read", type=int, default=384, help="synthetic read: samples")
    parser.add_argument("--read-workers", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--write-sizes", default="1000,10000")
    parser.add_argument("--write-workers", type=int, default=1)
    parser.add_argument("--image-width", type=int, default=512, help="MedFuse stores width-512 JPEGs")
    parser.add_argument("--image-height", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "shards.json"))
    parser.add_argument("--_write-child", nargs=2, metavar=("N", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._write_child:
        write_child(int(args._write_child[0]), args._write_child[1], args.image_width, args.image_height,
                    args.write_workers)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    workers = [int(w) for w in args.read_workers.split(",")]
    if args.source == "demo":
        default_dir = Path(tempfile.gettempdir()) / f"kdscale-bench-demo-n{args.demo_n}-s{args.demo_seed}"
        demo_dir = Path(args.demo_dir or default_dir)
        read = bench_read_demo(args.demo_n, args.demo_seed, demo_dir, args.batch_size, workers, args.epochs,
                               not args.no_cold)
    else:
        read = bench_read(args.n_read, args.image_width, args.image_height, args.batch_size, workers, args.epochs,
                          not args.no_cold)
    write_rows = bench_write([int(s) for s in args.write_sizes.split(",")], args.image_width, args.image_height,
                             args.write_workers)
    write = {"source": "synthetic",
             "note": ("synthetic source (pre-encoded %dx%d JPEG pool, 76-feature EHR): generating a 10k-stay demo "
                      "tree takes > 60 s on 2 cores, and a free source isolates the writer" %
                      (args.image_width, args.image_height)),
             "rows": write_rows}
    result = {"read": read, "write": write, "args": {k: v for k, v in vars(args).items() if k != "_write_child"},
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "platform": platform.platform(), "gpu": False,
                          "page_cache": "warm for first_epoch and steady; cold_epoch: the reader's files evicted "
                                        "from the guest page cache (posix_fadvise DONTNEED) just before"}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
