"""Talking to SLURM: which cluster to use, the submitit parameters of a job, the sbatch script
submitit writes, and sacct / squeue / scancel for --status, --wait and --cancel."""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

from launch.plan import JobSpec

REPO = Path(__file__).resolve().parent.parent
TERMINAL = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                      "BOOT_FAIL", "DEADLINE", "REVOKED"})
SACCT_FIELDS = ("JobID", "JobName", "State", "ExitCode", "Reason", "Submit", "Start", "End", "Elapsed", "NodeList")


def slurm_available() -> tuple[bool, str]:
    """SLURM is usable when sbatch is on PATH and a config is reachable (SLURM_CONF, the usual
    config files, or a controller that answers scontrol ping: configless sites)."""
    if shutil.which("sbatch") is None:
        return False, "no sbatch on PATH"
    conf = os.environ.get("SLURM_CONF")
    if conf:
        return (True, f"SLURM_CONF={conf}") if Path(conf).is_file() else (False, f"SLURM_CONF={conf} does not exist")
    for path in ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf", "/usr/local/etc/slurm.conf"):
        if Path(path).is_file():
            return True, path
    why = "SLURM_CONF is unset, no slurm.conf in /etc/slurm and `scontrol ping` finds no controller"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False, why
    return (True, "scontrol ping") if ping.returncode == 0 and "UP" in ping.stdout else (False, why)


def detect_cluster() -> str:
    return "slurm" if slurm_available()[0] else "local"


@contextlib.contextmanager
def clean_slurm_env():
    """Hide an enclosing job's SLURM_* variables (but not SLURM_CONF) while submitting, so that
    the new jobs do not inherit its id, CPU binding or task counts."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("SLURM_") and k != "SLURM_CONF"}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def job_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def setup_lines(cpus_per_task: int, env: dict[str, str], workdir: str) -> list[str]:
    """The jobs' environment. They run in the launcher's working directory, so relative paths in
    the config mean what they mean to `kdscale` run there; launch.jobs comes from PYTHONPATH."""
    lines = [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
             f"export OMP_NUM_THREADS={cpus_per_task}",
             "export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(f"cd {shlex.quote(workdir)}")
    return lines


def slurm_parameters(job: JobSpec, *, job_name: str, time_min: int, signal_delay_s: int,
                     partition: str = "", account: str = "", qos: str = "", dependency: str = "",
                     extra: Optional[dict] = None, env: Optional[dict] = None,
                     array_parallelism: int = 256) -> dict:
    """The SlurmExecutor parameters (submitit's names) of one job."""
    layout = job.layout
    params = {"job_name": job_name, "time": time_min, "nodes": layout.nodes, "ntasks_per_node": layout.tasks_per_node,
              "cpus_per_task": layout.cpus_per_task, "signal_delay_s": signal_delay_s,
              "setup": setup_lines(layout.cpus_per_task, env or {}, os.getcwd()),
              # one failed rank stops the step instead of leaving the others in a collective
              "srun_args": ["--kill-on-bad-exit=1"],
              "additional_parameters": {"requeue": True, "kill-on-invalid-dep": "yes", **(extra or {})}}
    if layout.gpus_per_node:
        params["gpus_per_node"] = layout.gpus_per_node
    for key, value in (("partition", partition), ("account", account), ("qos", qos), ("dependency", dependency)):
        if value:
            params[key] = value
    if job.array:
        params["array_parallelism"] = array_parallelism
    return params


def submitit_command(folder: str, python: str) -> str:
    return " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(job: JobSpec, folder: str, params: dict, python: str) -> str:
    """The sbatch script submitit writes for this job (arrays included)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=submitit_command(folder, python), folder=folder,
                               map_count=len(job.tasks) if job.array else None, **params)


def submit_slurm(job: JobSpec, folder: str, params: dict, python: str, payloads: list) -> str:
    """Submit one job (an array when it has several tasks); its SLURM job id."""
    import submitit

    from launch.jobs import StageJob

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max(p.max_requeues for p in payloads),
                                      python=python)
    executor.update_parameters(**params)
    with clean_slurm_env():
        if job.array:
            with executor.batch():
                handles = [executor.submit(StageJob(p)) for p in payloads]
        else:
            handles = [executor.submit(StageJob(payloads[0]))]
    return str(handles[0].job_id).split("_")[0]


# ---------------------------------------------------------------------------------------------
# sacct / squeue / scancel
# ---------------------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def sacct_rows(job_ids: Iterable[str]) -> list[dict]:
    """One row per job / array task (allocations only, latest attempt of a requeued job)."""
    ids = ",".join(str(i) for i in job_ids)
    if not ids:
        return []
    proc = _run(["sacct", "-X", "-n", "-P", "-j", ids, "-o", ",".join(SACCT_FIELDS)])
    rows = []
    for line in proc.stdout.splitlines():
        values = line.split("|")
        if len(values) == len(SACCT_FIELDS):
            rows.append(dict(zip(SACCT_FIELDS, values)))
    return rows


def squeue_active(job_ids: Iterable[str]) -> list[tuple[str, str]]:
    ids = ",".join(str(i) for i in job_ids)
    if not ids:
        return []
    proc = _run(["squeue", "-h", "-j", ids, "-o", "%i %T"])
    return [tuple(line.split()[:2]) for line in proc.stdout.splitlines() if len(line.split()) >= 2]


def scancel(job_ids: Iterable[str]) -> subprocess.CompletedProcess:
    return _run(["scancel", *[str(i) for i in job_ids]])


def base_id(job_id: str) -> str:
    return str(job_id).split("_")[0].split(".")[0]
