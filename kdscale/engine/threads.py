"""How many intra-op threads each process may use: its share of the CPUs it was given.

PyTorch's default is one OpenMP thread per core *of the machine*, whoever else runs there. On a
shared node (a SLURM allocation of a few cores, several local ranks, DataLoader workers) that
oversubscribes the cores and spinning OpenMP threads slow training several-fold (issue 16: 182 ->
~20 samples/s on 2 cores until OMP_NUM_THREADS=1). So every kdscale command caps the threads of
its process to its share by default:

    share = allocated CPUs // local ranks - DataLoader workers of this rank   (at least 1)

where the allocated CPUs are ``SLURM_CPUS_PER_TASK`` under SLURM (already per task, so not divided
again among the ranks of the node), else the CPUs this process may run on (``sched_getaffinity``,
which respects cgroups/taskset), divided among ``LOCAL_WORLD_SIZE`` ranks. ``run.threads`` (> 0)
or the environment variable ``KDSCALE_THREADS`` set the number instead (docs/platform.md).
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

import torch

log = logging.getLogger(__name__)

ENV_OVERRIDE = "KDSCALE_THREADS"
# Read by OpenMP / MKL / OpenBLAS when a child process (a spawned worker) starts its runtime.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_share(cpus: int, local_ranks: int = 1, loader_workers: int = 0, per_task: bool = False) -> int:
    """Intra-op threads for one process (pure). ``per_task``: ``cpus`` is already this rank's
    allocation (SLURM_CPUS_PER_TASK), so it is not divided among the local ranks. DataLoader
    workers each keep a core for decoding (PyTorch runs them single-threaded)."""
    if cpus < 1 or local_ranks < 1 or loader_workers < 0:
        raise ValueError(f"thread_share needs cpus >= 1, local_ranks >= 1, loader_workers >= 0; "
                         f"got {cpus}, {local_ranks}, {loader_workers}")
    mine = cpus if per_task else cpus // local_ranks
    return max(1, mine - loader_workers)


def allocated_cpus(env: Mapping[str, str] | None = None) -> tuple[int, bool, str]:
    """(CPUs, per_task, where that number came from)."""
    env = os.environ if env is None else env
    slurm = env.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm:
        if not slurm.isdigit() or int(slurm) < 1:
            raise ValueError(f"environment variable SLURM_CPUS_PER_TASK={slurm!r} is not a positive integer")
        return int(slurm), True, "SLURM_CPUS_PER_TASK"
    try:
        return len(os.sched_getaffinity(0)), False, "CPU affinity"
    except (AttributeError, OSError):   # not on Linux
        return os.cpu_count() or 1, False, "cpu_count"


def _positive_int(value: str, name: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer (number of threads)")
    return int(value)


def choose_threads(configured: int = 0, loader_workers: int = 0, env: Mapping[str, str] | None = None
                   ) -> tuple[int, str]:
    """(threads, why) for this process: ``configured`` (run.threads) if > 0, else KDSCALE_THREADS,
    else the share of the allocated CPUs."""
    env = os.environ if env is None else env
    if configured > 0:
        return configured, "run.threads"
    if env.get(ENV_OVERRIDE, "").strip():
        return _positive_int(env[ENV_OVERRIDE], ENV_OVERRIDE), ENV_OVERRIDE
    cpus, per_task, source = allocated_cpus(env)
    local_ranks = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    if not per_task and "LOCAL_WORLD_SIZE" not in env and env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        local_ranks = int(env["SLURM_NTASKS_PER_NODE"])
    share = thread_share(cpus, max(1, local_ranks), loader_workers, per_task)
    return share, (f"{cpus} CPUs ({source})" + ("" if per_task else f" / {local_ranks} local rank(s)")
                   + f" - {loader_workers} loader worker(s)")


def cap_threads(configured: int = 0, loader_workers: int = 0, env: Mapping[str, str] | None = None) -> int:
    """Set this process's intra-op threads (torch) and the OpenMP/MKL variables its child
    processes inherit; returns the number."""
    threads, why = choose_threads(configured, loader_workers, env)
    torch.set_num_threads(threads)
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    log.info("intra-op threads: %d (%s)", threads, why)
    return threads
