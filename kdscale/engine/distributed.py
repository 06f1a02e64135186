"""One description of the process world, whoever started us: torchrun, SLURM (srun/submitit), or
nobody (a single process).

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under SLURM every task gets
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the job's node list; ``export_env`` turns those into
the torchrun variables, so Accelerate and ``torch.distributed`` agree on one world description.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import re
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # single | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env, name: str, default: int) -> int:
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'n[3-5,7],m1' -> 'n3'. Uses ``scontrol show
    hostnames`` when available (it knows every syntax), else parses the common forms."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def port_for_job(job_id: str) -> int:
    """A port in [15000, 25000) derived from the job id: every task of a job computes the same
    one, and concurrent jobs on one node rarely collide."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 15000 + int(digits[-4:]) % 10000


def detect_world(env=None) -> World:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or SLURM after export_env
        return World(rank=_int(env, "RANK", 0), world_size=_int(env, "WORLD_SIZE", 1),
                     local_rank=_int(env, "LOCAL_RANK", 0), local_world_size=_int(env, "LOCAL_WORLD_SIZE", 1),
                     master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=_int(env, "MASTER_PORT", 29500),
                     launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else env.get("KDSCALE_LAUNCHER", "env"))
    if "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job_id = env.get("SLURM_JOB_ID", "0")
        return World(rank=_int(env, "SLURM_PROCID", 0), world_size=_int(env, "SLURM_NTASKS", 1),
                     local_rank=_int(env, "SLURM_LOCALID", 0),
                     local_world_size=_int(env, "SLURM_NTASKS_PER_NODE", 1) if
                     env.get("SLURM_NTASKS_PER_NODE", "").isdigit() else 1,
                     master_addr=first_host(nodelist), master_port=port_for_job(job_id), launcher="slurm")
    return World()


def export_env(world: World) -> None:
    """Write the torchrun variables for ``world`` (what Accelerate and init_process_group read)."""
    os.environ.update({"RANK": str(world.rank), "WORLD_SIZE": str(world.world_size),
                       "LOCAL_RANK": str(world.local_rank), "LOCAL_WORLD_SIZE": str(world.local_world_size),
                       "MASTER_ADDR": world.master_addr, "MASTER_PORT": str(world.master_port),
                       "KDSCALE_LAUNCHER": world.launcher})


def init_distributed(world: World, backend: str = "gloo", timeout_s: float = 600.0) -> None:
    """init_process_group for a multi-process world (no-op for one process or if already up)."""
    # launch/ (submission side, no torch) imports this module: torch only in the collectives
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return
    export_env(world)
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def teardown(*objects) -> None:
    """End a distributed run cleanly. torch 2.13 + gloo often aborts at interpreter exit
    ("terminate called without an active exception") unless every reference to communicating
    objects is gone and the process group is destroyed first (platform-notes.md)."""
    # launch/ (submission side, no torch) imports this module: torch only in the collectives
    import torch.distributed as dist

    del objects
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] without a process group."""
    # launch/ (submission side, no torch) imports this module: torch only in the collectives
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    # launch/ (submission side, no torch) imports this module: torch only in the collectives
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    # launch/ (submission side, no torch) imports this module: torch only in the collectives
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
