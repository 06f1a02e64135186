#!/usr/bin/env python
"""Write the WebDataset shards of a data source (format: shards/README.md).

    python shards/build.py --cfg configs/data/<source>.yaml [key=value ...] [--workers N]
                           [--task-index i --num-tasks n]

Task i of n writes the shards whose per-split index k satisfies k % n == i (e.g. a SLURM array:
--task-index $SLURM_ARRAY_TASK_ID --num-tasks $SLURM_ARRAY_TASK_COUNT). Every task reads the
whole source; the one that finds every shard done writes index.json. Re-running writes only the
missing shards. Exit status: 0 = complete, 3 = this task is done but other tasks' shards are
missing, 1 = error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--cfg", required=True, help="config YAML (e.g. configs/data/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. shards.max_samples_per_shard=500")
    parser.add_argument("--workers", type=int, default=1, help="local encoder processes (default 1)")
    parser.add_argument("--task-index", type=int, default=0, help="this task's index i (default 0)")
    parser.add_argument("--num-tasks", type=int, default=1, help="number of tasks n (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from kdscale.config import ConfigError
    from kdscale.data.ingest import DataError
    from kdscale.data.shards import build_shards
    from kdscale.schema import load_config

    try:
        cfg = load_config(args.cfg, args.overrides)
        summary = build_shards(cfg, workers=args.workers, task_index=args.task_index,
                               num_tasks=args.num_tasks, progress=not args.no_progress and sys.stderr.isatty())
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k not in ("ingest",)}, indent=1, default=str))
    if not summary.get("complete"):
        return 3
    return 0 if summary.get("reconciles") else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
