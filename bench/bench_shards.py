#!/usr/bin/env python
"""Shard benchmark: read throughput (shard loader vs a per-file MedFuse-style dataset vs pure
decode+transform of in-memory bytes) and write throughput + peak RSS of the shard writer.

    python bench/bench_shards.py                          # demo source (default), ~2-3 min on 2 cores
    python bench/bench_shards.py --source synthetic       # the older synthetic per-file tree
    python bench/bench_shards.py --demo-n 2000 --write-sizes 1000,10000,50000

Read, ``--source demo`` (default): generates (or reuses) the MIMIC demo tree
(``kdscale.data.sources.demo.generate``), builds shards from it with ``build_shards`` and
configs/data/demo_mimic.yaml (phenotyping, partial cohort), then reads the train split
(a) through the shard loader and (b) through ``MedFuseDataset``, which does what MedFuse's
``__getitem__`` does per sample: open the CXR JPEG from the ``files/pXX/p<subject>/s<study>/``
tree with PIL, read the stay's raw ``episodeN_timeseries.csv``, discretize it (76 features) and
normalize it with a normalizer fitted once at setup. Same samples, transforms, batch size and
worker counts. ``--source synthetic`` keeps the older synthetic tree (pre-discretized numeric
EHR CSVs, 512x512 JPEGs).

Write: samples/s, MB/s and peak RSS of ``build_shards`` at ``--write-sizes``, always from the
synthetic source (generating a 10k-stay demo tree takes ~80 s on 2 cores, longer than the
benchmark budget; the synthetic source costs ~nothing, so the writer is what is measured).

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


def _cfg(out: Path, per_shard: int):
    from kdscale.schema import load_config

    return load_config(None, [f"run.out_dir={out}", f"shards.max_samples_per_shard={per_shard}"])


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
    base_rss = _peak_rss_mb()
    start = time.perf_counter()
    summary = build_shards(_cfg(Path(out), 1000), workers=workers, source=source)
    elapsed = time.perf_counter() - start
    size = sum(p.stat().st_size for p in Path(out, "shards").glob("*/*.tar"))
    print(json.dumps({"samples": summary["written"], "seconds": elapsed, "samples_per_s": n / elapsed,
                      "mb_per_s": size / elapsed / 1e6, "shard_bytes": size,
                      "peak_rss_mb": _peak_rss_mb(), "peak_rss_before_build_mb": base_rss,
                      "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def bench_write(sizes: list[int], width: int, height: int, workers: int) -> list[dict]:
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="kdscale-bench-") as tmp:
            cmd = [sys.executable, __file__, "--_write-child", str(n), tmp, "--image-width", str(width),
                   "--image-height", str(height), "--write-workers", str(workers)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append({"n": n, "workers": workers, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(f"write {n:>7} samples: {results[-1]['samples_per_s']:8.0f} samples/s "
              f"{results[-1]['mb_per_s']:7.1f} MB/s  peak RSS {results[-1]['peak_rss_mb']:.0f} MB", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Read
# ---------------------------------------------------------------------------------------------

class PerFileDataset:
    """MedFuse-style: a listfile CSV read once; per sample, open the JPEG file and parse the
    sample's EHR CSV (MedFuse reads one ``*_timeseries.csv`` per stay)."""

    def __init__(self, root: Path, transform):
        with open(root / "listfile.csv") as fh:
            self.rows = list(csv.DictReader(fh))
        self.root, self.transform = root, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from PIL import Image

        row = self.rows[i]
        with Image.open(self.root / "files" / f"{row['key']}.jpg") as img:
            image = self.transform(img.convert("RGB"))
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


def write_per_file_tree(source: BenchSource, root: Path) -> None:
    (root / "files").mkdir(parents=True)
    (root / "ehr").mkdir()
    with open(root / "listfile.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["key", "labels"])
        for i in range(source.n):
            rec = source.record(i)
            (root / "files" / f"{rec.key}.jpg").write_bytes(rec.image)
            with open(root / "ehr" / f"{rec.key}_timeseries.csv", "w", newline="") as eh:
                w = csv.writer(eh)
                w.writerow([f"f{j}" for j in range(N_FEATURES)])
                w.writerows(rec.ehr.tolist())
            out.writerow([rec.key, " ".join(str(int(v)) for v in rec.labels)])


def _timed(iterable, count) -> float:
    start = time.perf_counter()
    n = sum(count(batch) for batch in iterable)
    return n / (time.perf_counter() - start)


def bench_read(n: int, width: int, height: int, batch: int, workers: list[int]) -> dict:
    import torch

    from kdscale.data.loader import LoaderConfig, build_loader
    from kdscale.data.shards import build_shards
    from kdscale.data.transforms import build_image_transform, decode_image

    source = BenchSource(n, width, height)
    results = {"n": n, "batch_size": batch, "shard_loader": {}, "per_file": {}}
    with tempfile.TemporaryDirectory(prefix="kdscale-bench-") as tmp:
        tmp = Path(tmp)
        build_shards(_cfg(tmp, max(16, n // 16)), source=BenchSource(n, width, height))
        write_per_file_tree(source, tmp / "perfile")
        cfg = LoaderConfig(batch_size=batch, drop_last=False, modalities=["image", "ehr"])
        transform = build_image_transform(cfg, train=True)
        images = [source.record(i).image for i in range(min(n, 256))]
        start = time.perf_counter()
        for data in images:
            transform(decode_image(data))
        results["pure_decode_transform"] = len(images) / (time.perf_counter() - start)
        print(f"pure decode+transform (1 process): {results['pure_decode_transform']:8.1f} samples/s", flush=True)
        for w in workers:
            cfg.num_workers = w
            loader = build_loader(tmp / "shards", "train", cfg, train=True, rank=0, world_size=1)
            results["shard_loader"][w] = _timed(loader, lambda b: int(b["valid"].sum()))
            dataset = PerFileDataset(tmp / "perfile", transform)
            per_file = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=w,
                                                   collate_fn=per_file_collate)
            results["per_file"][w] = _timed(per_file, lambda b: b[0].shape[0])
            print(f"workers {w}: shard loader {results['shard_loader'][w]:8.1f} samples/s   "
                  f"per-file {results['per_file'][w]:8.1f} samples/s", flush=True)
    results["shard_loader_w0_over_pure"] = results["shard_loader"][workers[0]] / results["pure_decode_transform"]
    results["ratio_shard_over_per_file"] = {w: results["shard_loader"][w] / results["per_file"][w] for w in workers}
    results["source"] = "synthetic"
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
    JPEG with PIL, ``.convert("RGB")``, train transform; read the raw ``episodeN_timeseries.csv``
    (Hours + 17 channels as strings), Discretizer.transform (76 features), Normalizer.apply.
    A stay without a paired image gets a zero image (3 x size x size), as in MedFuse.
    """

    def __init__(self, items: list[dict], discretizer, normalizer, transform, image_size: int):
        self.items, self.discretizer, self.normalizer = items, discretizer, normalizer
        self.transform, self.image_size = transform, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        from kdscale.data.ehr import read_timeseries_csv

        item = self.items[i]
        if item["image_file"] is not None:
            with Image.open(item["image_file"]) as img:
                image = self.transform(img.convert("RGB"))
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
    """Generate/reuse the demo tree, build its shards, collect the per-file list of train samples."""
    from kdscale.data.demo.mimic_demo import mimic_config_for_demo
    from kdscale.data.ehr import Normalizer
    from kdscale.data.ingest import IngestLog
    from kdscale.data.shards import build_shards, npy_bytes
    from kdscale.data.sources.demo import generate
    from kdscale.data.sources.mimic import MimicSource
    from kdscale.schema import load_config

    start = time.perf_counter()
    from kdscale.data.sources.demo import MARKER

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
    items, memory = [], []
    for rec in source.records(IngestLog(source="bench")):
        if rec.split != "train":
            continue
        normalizer.update(rec.ehr)
        items.append({"key": rec.key, "image_file": rec.meta.get("image_file"),
                      "timeseries_file": rec.meta["timeseries_file"], "hours": float(rec.meta["ehr_hours"]),
                      "labels": np.asarray(rec.labels, dtype=np.float32)})
        memory.append((rec.image, npy_bytes(np.asarray(rec.ehr, dtype=np.float32))))
    normalizer.finalize()
    if len(items) != index["num_samples"]:
        raise RuntimeError(f"per-file list has {len(items)} train samples, shards {index['num_samples']}")
    return {"items": items, "memory": memory, "discretizer": source.discretizer, "normalizer": normalizer,
            "shard_dir": shard_dir, "index": index, "generate_s": gen_s, "build_s": build_s,
            "build_summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))},
            "demo_dir": str(demo_dir), "demo_reused": reused}


def pure_decode(memory: list, transform, normalizer) -> float:
    """Samples/s of decode+transform of in-memory image bytes + npy EHR decode + normalize."""
    from kdscale.data.transforms import decode_image

    start = time.perf_counter()
    for image, ehr in memory:
        if image is not None:
            transform(decode_image(image))
        normalizer.apply(np.load(io.BytesIO(ehr), allow_pickle=False))
    return len(memory) / (time.perf_counter() - start)


def bench_read_demo(n: int, seed: int, demo_dir: Path, batch: int, workers: list[int], epochs: int) -> dict:
    import torch

    from kdscale.data.loader import LoaderConfig, build_loader
    from kdscale.data.transforms import build_image_transform

    with tempfile.TemporaryDirectory(prefix="kdscale-bench-") as tmp:
        tmp = Path(tmp)
        setup = demo_setup(n, seed, demo_dir, tmp, per_shard=max(16, n // 16))
        items = setup["items"]
        paired = sum(it["image_file"] is not None for it in items)
        cfg = LoaderConfig(batch_size=batch, drop_last=False, modalities=["image", "ehr"])
        transform = build_image_transform(cfg, train=True)
        results = {"source": "demo", "demo_n": n, "demo_seed": seed, "task": DEMO_TASK, "cohort": DEMO_COHORT,
                   "demo_dir": setup["demo_dir"], "demo_generate_s": round(setup["generate_s"], 2),
                   "shard_build_s": round(setup["build_s"], 2), "train_samples": len(items),
                   "train_samples_with_image": paired, "shards": len(setup["index"]["shards"]),
                   "batch_size": batch, "epochs_per_measurement": epochs,
                   "samples_per_s": {"shard_loader": {}, "per_file_medfuse": {}},
                   "ratio_shard_over_per_file": {}, "ratio_shard_over_pure": {}}
        print(f"demo tree n={n}: {len(items)} train stays ({paired} with an image), "
              f"{len(setup['index']['shards'])} shards; generate {setup['generate_s']:.1f} s, "
              f"build {setup['build_s']:.1f} s", flush=True)
        pure = pure_decode(setup["memory"], transform, setup["normalizer"])
        results["samples_per_s"]["pure_decode_transform"] = pure
        print(f"pure decode+transform+EHR decode (1 process, in memory): {pure:8.1f} samples/s", flush=True)
        dataset = MedFuseDataset(items, setup["discretizer"], setup["normalizer"], transform, cfg.image_size)
        for w in workers:
            cfg.num_workers = w
            shard_s, file_s = [], []
            for epoch in range(epochs):
                loader = build_loader(setup["shard_dir"], "train", cfg, train=True, rank=0, world_size=1,
                                      epoch=epoch)
                shard_s.append(_timed(loader, lambda b: int(b["valid"].sum())))
                per_file = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=w,
                                                       collate_fn=_collate_pairs)
                file_s.append(_timed(per_file, lambda b: b[0].shape[0]))
            results["samples_per_s"]["shard_loader"][w] = max(shard_s)
            results["samples_per_s"]["per_file_medfuse"][w] = max(file_s)
            results["ratio_shard_over_per_file"][w] = max(shard_s) / max(file_s)
            results["ratio_shard_over_pure"][w] = max(shard_s) / pure
            print(f"workers {w}: shard loader {max(shard_s):8.1f} samples/s   per-file (MedFuse) "
                  f"{max(file_s):8.1f} samples/s   shard/per-file {max(shard_s) / max(file_s):5.2f}x   "
                  f"shard/pure {max(shard_s) / pure:5.2f}", flush=True)
        results["target_3x_met"] = {w: r >= 3.0 for w, r in results["ratio_shard_over_per_file"].items()}
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
    parser.add_argument("--epochs", type=int, default=2, help="demo read: epochs per measurement, best kept")
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
        demo_dir = Path(args.demo_dir or Path(tempfile.gettempdir()) / f"kdscale-bench-demo-n{args.demo_n}-s{args.demo_seed}")
        read = bench_read_demo(args.demo_n, args.demo_seed, demo_dir, args.batch_size, workers, args.epochs)
    else:
        read = bench_read(args.n_read, args.image_width, args.image_height, args.batch_size, workers)
    write_rows = bench_write([int(s) for s in args.write_sizes.split(",")], args.image_width, args.image_height,
                             args.write_workers)
    write = {"source": "synthetic",
             "note": ("synthetic source (pre-encoded %dx%d JPEG pool, 76-feature EHR): generating a 10k-stay demo "
                      "tree takes > 60 s on 2 cores, and a free source isolates the writer" %
                      (args.image_width, args.image_height)),
             "rows": write_rows}
    result = {"read": read, "write": write, "args": {k: v for k, v in vars(args).items() if k != "_write_child"},
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "platform": platform.platform(), "gpu": False, "page_cache": "warm"}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
