#!/usr/bin/env python
"""Write the WebDataset shards of a data source (format: shards/README.md).

    python shards/build.py --cfg configs/data/<source>.yaml [key=value ...] [--workers N]
                           [--task-index i --num-tasks n]

The same as `kdscale shards`. Task i of n writes the shards whose per-split index k satisfies
k % n == i (e.g. a SLURM array: --task-index $SLURM_ARRAY_TASK_ID --num-tasks
$SLURM_ARRAY_TASK_COUNT). Every task reads the whole source; the one that finds every shard done
writes index.json. Re-running writes only the missing shards. Exit status: 0 = complete,
3 = this task is done but other tasks' shards are missing, 1 = counts do not reconcile,
2 = config or data error.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from kdscale.cli import main

    sys.exit(main(["shards", *sys.argv[1:]]))
