"""Each process's intra-op threads: its share of the allocated CPUs (issue 16, finding 11)."""
from __future__ import annotations

import os

import pytest

from kdscale.engine.threads import allocated_cpus, cap_threads, choose_threads, thread_share


def test_share_divides_cpus_among_local_ranks_and_leaves_loader_workers_a_core():
    assert thread_share(16) == 16
    assert thread_share(16, local_ranks=4) == 4
    assert thread_share(16, local_ranks=4, loader_workers=2) == 2
    assert thread_share(2, local_ranks=1, loader_workers=2) == 1     # the 2-core case of the issue
    assert thread_share(3, local_ranks=4) == 1                       # never 0
    assert thread_share(8, local_ranks=4, per_task=True) == 8        # SLURM_CPUS_PER_TASK is per rank
    with pytest.raises(ValueError, match="cpus >= 1"):
        thread_share(0)


def test_allocation_from_slurm_else_affinity():
    assert allocated_cpus({"SLURM_CPUS_PER_TASK": "6"}) == (6, True, "SLURM_CPUS_PER_TASK")
    cpus, per_task, source = allocated_cpus({})
    assert cpus == len(os.sched_getaffinity(0)) and not per_task and source == "CPU affinity"
    with pytest.raises(ValueError, match="SLURM_CPUS_PER_TASK='x'"):
        allocated_cpus({"SLURM_CPUS_PER_TASK": "x"})


def test_choice_order_config_then_env_then_share():
    env = {"SLURM_CPUS_PER_TASK": "8", "LOCAL_WORLD_SIZE": "4"}
    assert choose_threads(0, 2, env)[0] == 6
    n, why = choose_threads(0, 0, {"LOCAL_WORLD_SIZE": "2", "SLURM_NTASKS_PER_NODE": "9"})
    assert n == max(1, len(os.sched_getaffinity(0)) // 2) and "2 local rank" in why
    assert choose_threads(0, 0, {**env, "KDSCALE_THREADS": "3"}) == (3, "KDSCALE_THREADS")
    assert choose_threads(5, 0, {**env, "KDSCALE_THREADS": "3"}) == (5, "run.threads")
    with pytest.raises(ValueError, match="KDSCALE_THREADS='many'"):
        choose_threads(0, 0, {"KDSCALE_THREADS": "many"})


def test_cap_sets_torch_and_child_environment(monkeypatch):
    import torch

    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    try:
        assert cap_threads(0, 0, {"SLURM_CPUS_PER_TASK": "1"}) == 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_run_threads_config_key_is_validated():
    from kdscale.config import ConfigError
    from kdscale.schema import load_config

    assert load_config(None, ["run.threads=2"]).run.threads == 2
    with pytest.raises(ConfigError, match=r"run.threads must be >= 0"):
        load_config(None, ["run.threads=-1"])
