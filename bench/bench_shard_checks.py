#!/usr/bin/env python
"""Cost of the loader's shard checks against index.json (issue 13): the size check at loader
construction (one stat per shard), and while reading the sample count (read on to the end of
the tar) and the sha256 of every shard read to its end (once per shard and process).

    python bench/bench_shard_checks.py                       # demo MIMIC, 1000 stays, ~2 min on 2 cores
    python bench/bench_shard_checks.py --demo-n 1000 --epochs 4 --workers 0,2

Same data and loader settings as bench_shards.py's read benchmark (demo tree + configs/data/
demo_mimic.yaml; image + EHR, MedFuse train transform, batch 32). Per worker count, two loaders
over the same shards, one with the checks and one with them switched off (``loader.checks =
None``), timed interleaved: the first epoch (the checks hash each shard then) and the median of
the next ``--epochs`` (already hashed: only the count check runs). Also the raw sha256 rate of
the train shards (the upper bound of the hashing cost). Prints JSON; nothing is written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _epoch(loader) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["key"])
    return time.perf_counter() - start, n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-n", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs after the first, per loader")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import bench_shards
    from kdscale.data import loader as loader_mod
    from kdscale.data.loader import LoaderConfig, _check_shard_files, build_loader

    with tempfile.TemporaryDirectory(prefix="kdscale-bench-checks-") as tmp:
        setup = bench_shards.demo_setup(args.demo_n, 0, Path(tmp) / "demo", Path(tmp) / "run", 16)
        shard_dir, index = setup["shard_dir"], setup["index"]
        tars = [shard_dir / "train" / s["name"] for s in index["shards"]]
        total_mb = sum(p.stat().st_size for p in tars) / 2 ** 20
        start = time.perf_counter()
        for path in tars:
            sha = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    sha.update(block)
        hash_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(100):
            _check_shard_files(shard_dir, "train", index)
        stat_ms = (time.perf_counter() - start) * 1000 / 100
        results = {"train_shards": len(tars), "train_samples": index["num_samples"], "train_mb": round(total_mb, 2),
                   "sha256_mb_per_s": round(total_mb / hash_s, 1), "sha256_s_per_epoch": round(hash_s, 3),
                   "size_check_ms_per_loader": round(stat_ms, 3), "workers": {}}
        for workers in [int(w) for w in args.workers.split(",")]:
            cfg = LoaderConfig(batch_size=args.batch_size, num_workers=workers, drop_last=False,
                               modalities=["image", "ehr"])
            loaders = {}
            for name in ("checked", "unchecked"):
                loaders[name] = build_loader(shard_dir, "train", cfg, train=True, rank=0, world_size=1)
            loaders["unchecked"].checks = None
            warm = build_loader(shard_dir, "train", cfg, train=True, rank=0, world_size=1)
            warm.checks = None
            _epoch(warm)        # imports, decoder set-up, page cache: paid before anything is timed
            warm.close()
            times: dict = {name: [] for name in loaders}
            for epoch in range(args.epochs + 1):
                order = list(loaders) if epoch % 2 == 0 else list(reversed(loaders))   # no order bias
                for name in order:
                    loader = loaders[name]
                    if epoch == 0:
                        loader_mod._VERIFIED_SHARDS.clear()   # the first epoch of a fresh process
                    loader.set_epoch(epoch)
                    seconds, n = _epoch(loader)
                    times[name].append(n / seconds)
            row = {}
            for name, rates in times.items():
                row[name] = {"first_epoch_samples_per_s": round(rates[0], 1),
                             "steady_samples_per_s": round(statistics.median(rates[1:]), 1)}
            row["first_epoch_overhead_pct"] = round(100 * (row["unchecked"]["first_epoch_samples_per_s"] /
                                                           row["checked"]["first_epoch_samples_per_s"] - 1), 1)
            row["steady_overhead_pct"] = round(100 * (row["unchecked"]["steady_samples_per_s"] /
                                                      row["checked"]["steady_samples_per_s"] - 1), 1)
            results["workers"][workers] = row
            for loader in loaders.values():
                loader.close()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
