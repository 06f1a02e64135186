"""A real single-machine SLURM cluster for tests (slurm/local-cluster/start.sh), as a pytest fixture.

Use it from any test module::

    import pytest
    from slurm_cluster import slurm_cluster  # noqa: F401  (the session-scoped fixture)

    @pytest.mark.slurm
    def test_something(slurm_cluster, tmp_path):
        job_id = slurm_cluster.sbatch("#!/bin/bash\\nsrun hostname\\n", "-N2", "-o", str(tmp_path / "%j.out"))
        assert slurm_cluster.wait_for_state(job_id) == "COMPLETED"
        ex = slurm_cluster.submitit_executor(tmp_path / "submitit", nodes=2, tasks_per_node=1)

The fixture starts 4 nodes (n1..n4, partition ``debug``), exports ``SLURM_CONF`` into ``os.environ``
for the session (so submitit and the SLURM client tools find the cluster) and stops the cluster at the
end if it started it. When start.sh exits 2 (cannot provide SLURM here: not root, no apt-get, ...) the
tests are skipped, unless ``KDSCALE_REQUIRE_SLURM=1``, in which case they fail with the reason.

Always give submitit a fresh log folder per test (``tmp_path``): job ids are kept monotonic across
restarts, but a wiped state dir starts again at 1 and submitit would read a stale result.

This module is also imported inside the SLURM jobs (for the functions at the bottom), so keep its
top-level imports light; ``submitit_executor`` puts this directory on the jobs' PYTHONPATH.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
CLUSTER_DIR = REPO / "slurm" / "local-cluster"
START = CLUSTER_DIR / "start.sh"
STOP = CLUSTER_DIR / "stop.sh"
DEFAULT_STATE_DIR = Path(os.environ.get("KDSCALE_SLURM_STATE_DIR", "/tmp/kdscale-slurm"))
DEFAULT_NODES = 4
DEFAULT_CPUS_PER_NODE = 2
EXIT_UNAVAILABLE = 2
TERMINAL_STATES = frozenset({
    "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED",
})


class SlurmUnavailable(RuntimeError):
    """start.sh exited 2: SLURM cannot be provided on this machine (skip, do not fail)."""


def read_env_file(path: Path) -> dict[str, str]:
    """Parse the ``export KEY=VALUE`` lines of <state-dir>/env.sh."""
    env: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"\s*export\s+([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            env[m.group(1)] = m.group(2).strip().strip("'\"")
    return env


@dataclass
class SlurmCluster:
    """Handle on the local cluster: its client env, nodes and helpers around sbatch/sacct/scancel."""

    state_dir: Path = DEFAULT_STATE_DIR
    num_nodes: int = DEFAULT_NODES
    cpus_per_node: int = DEFAULT_CPUS_PER_NODE
    partition: str = "debug"
    env: dict[str, str] = field(default_factory=dict)  # from env.sh: SLURM_CONF, KDSCALE_SLURM_*
    start_seconds: float | None = None  # wall time of the last start.sh
    start_log: str = ""  # stderr of the last start.sh
    started_here: bool = False  # set by the fixture: False when the cluster was already up (then left up)
    job_ids: list[int] = field(default_factory=list)  # every job id submitted through this handle

    @property
    def nodes(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.num_nodes + 1)]

    # ------------------------------------------------------------------ lifecycle
    def _script(self, script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
        cmd = ["bash", str(script), "--state-dir", str(self.state_dir), *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError as exc:  # no bash
            raise SlurmUnavailable(f"cannot run {script.name}: {exc}") from exc

    def is_up(self) -> bool:
        args = ["--check", "--nodes", str(self.num_nodes), "--cpus-per-node", str(self.cpus_per_node)]
        return self._script(START, *args, timeout=60).returncode == 0

    def start(self, timeout: float = 900) -> "SlurmCluster":
        """Run start.sh (installs packages on first use). Raises SlurmUnavailable on exit code 2."""
        t0 = time.monotonic()
        proc = self._script(START, "--nodes", str(self.num_nodes), "--cpus-per-node", str(self.cpus_per_node),
                            timeout=timeout)
        self.start_seconds = time.monotonic() - t0
        self.start_log = (proc.stdout + proc.stderr).strip()
        if proc.returncode == EXIT_UNAVAILABLE:
            raise SlurmUnavailable(self.start_log.splitlines()[-1] if self.start_log else "start.sh exited 2")
        if proc.returncode != 0:
            raise RuntimeError(f"start.sh failed (exit {proc.returncode}):\n{self.start_log}")
        self.env = read_env_file(self.state_dir / "env.sh")
        return self

    def stop(self, timeout: float = 180) -> None:
        proc = self._script(STOP, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"stop.sh failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")

    # ------------------------------------------------------------------ clients
    def client_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """os.environ without inherited SLURM_* job variables, plus the cluster's env.sh."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(self.env)
        env.update(extra or {})
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, cwd: str | Path | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sinfo, sbatch, sacct, scancel, srun, ...) against this cluster."""
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env=self.client_env(), input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, script: str | Path, *args: str, cwd: str | Path | None = None) -> int:
        """Submit a batch script (text, or a path to one); returns the job id."""
        if isinstance(script, Path):
            proc = self.run("sbatch", "--parsable", *args, str(script), cwd=cwd)
        else:
            proc = self.run("sbatch", "--parsable", *args, cwd=cwd, input=script)
        job_id = int(proc.stdout.strip().split(";")[0])
        self.job_ids.append(job_id)
        return job_id

    SACCT_FIELDS = ("JobID", "State", "NodeList", "AllocNodes", "ExitCode", "Eligible", "Start", "End")

    def sacct(self, job_id: int | str, fields: Iterable[str] = SACCT_FIELDS) -> dict[str, str] | None:
        """The allocation's sacct row (no steps) as a dict, or None while sacct does not know the job yet."""
        fields = list(fields)
        proc = self.run("sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", ",".join(fields), check=False)
        for line in proc.stdout.splitlines():
            values = line.split("|")
            if len(values) == len(fields):
                return dict(zip(fields, values))
        return None

    def job_state(self, job_id: int | str) -> str | None:
        """The sacct state's first word ("CANCELLED by 0" -> "CANCELLED"); None when unknown."""
        row = self.sacct(job_id, ("JobID", "State"))
        return row["State"].split()[0] if row and row["State"] else None

    def _settled(self, row: dict[str, str]) -> bool:
        """Whether slurmdbd has the job's complete record. slurmctld may deliver a short job's start
        record after its end record: for ~1 s sacct then shows Eligible=Unknown and only the batch
        host in NodeList."""
        if row.get("Eligible") == "Unknown":
            return False
        alloc = int(row.get("AllocNodes") or 0)
        return alloc == 0 or len(self.hostnames(row["NodeList"])) == alloc

    def wait_for_state(self, job_id: int | str, states: Iterable[str] = TERMINAL_STATES,
                       timeout: float = 60, poll: float = 0.3, settle_s: float = 10) -> str:
        """Poll sacct until the job reaches one of ``states`` (default: any terminal state).

        For terminal states it also waits (up to ``settle_s`` more) until the accounting record is
        complete, so that a following ``sacct()`` shows the real NodeList/AllocNodes.
        """
        wanted = set(states)
        end = time.monotonic() + timeout
        state = None
        while time.monotonic() < end:
            row = self.sacct(job_id)
            state = row["State"].split()[0] if row and row["State"] else None
            if state in wanted:
                if state in TERMINAL_STATES:
                    settle_end = time.monotonic() + settle_s
                    while not self._settled(row) and time.monotonic() < settle_end:
                        time.sleep(poll)
                        row = self.sacct(job_id) or row
                return state
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} did not reach {sorted(wanted)} within {timeout}s (last: {state})")

    def scancel(self, job_id: int | str) -> None:
        self.run("scancel", str(job_id))

    def hostnames(self, nodelist: str) -> list[str]:
        """Expand a node list ("n[1-2]") with scontrol."""
        return self.run("scontrol", "show", "hostnames", nodelist).stdout.split()

    def submitit_executor(self, folder: str | Path, **params):
        """A submitit AutoExecutor on this cluster (partition debug, tests/ on the jobs' PYTHONPATH).

        ``folder`` must be fresh per test/run (see the module docstring); ``params`` go to
        ``update_parameters`` (e.g. nodes=2, tasks_per_node=1, timeout_min=5).
        """
        import submitit

        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        setup = [f"export PYTHONPATH={TESTS_DIR}${{PYTHONPATH:+:$PYTHONPATH}}"]
        setup += list(params.pop("slurm_setup", []))
        params.setdefault("timeout_min", 5)  # submitit signals USR2 90 s before the limit
        params.setdefault("slurm_partition", self.partition)
        executor.update_parameters(slurm_setup=setup, **params)
        return executor


def _report(request: pytest.FixtureRequest, message: str) -> None:
    """Write a line to the terminal even while output is captured."""
    terminal = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if terminal is None:
        return
    if capture is not None:
        with capture.global_and_fixture_disabled():
            terminal.write_line(message)
    else:
        terminal.write_line(message)


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest):
    """Session-scoped local SLURM cluster with 4 nodes; see the module docstring."""
    cluster = SlurmCluster(state_dir=DEFAULT_STATE_DIR, num_nodes=DEFAULT_NODES)
    reason = None
    try:
        cluster.started_here = not cluster.is_up()
        cluster.start()
    except SlurmUnavailable as exc:
        reason = f"local SLURM cluster unavailable: {exc}"
    if reason is not None:
        if os.environ.get("KDSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"{reason} (KDSCALE_REQUIRE_SLURM=1)", pytrace=False)
        pytest.skip(reason)
    installed = [line for line in cluster.start_log.splitlines() if "packages installed" in line]
    _report(request, f"\n[slurm_cluster] start.sh took {cluster.start_seconds:.1f}s "
                     f"({'cold: ' + installed[0].split(': ', 1)[-1] if installed else 'packages already installed'}"
                     f"{'' if cluster.started_here else '; cluster was already up'})")
    # SLURM_CONF for submitit and anything else that shells out to sbatch/sacct; hide inherited job vars.
    saved = {k: v for k, v in os.environ.items() if k.startswith("SLURM_") or k in cluster.env}
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            del os.environ[key]
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        for key in set(cluster.env) | {k for k in os.environ if k.startswith("SLURM_")}:
            os.environ.pop(key, None)
        os.environ.update(saved)
        if cluster.started_here:
            cluster.stop()


# ---------------------------------------------------------------------- functions run inside SLURM jobs
def gloo_allreduce(timeout_s: float = 60.0) -> dict:
    """All-reduce (sum) of rank+1 over every task of the job with torch.distributed/gloo.

    MASTER_ADDR is the job's first node and MASTER_PORT is derived from the job id
    (submitit.helpers.TorchDistributedEnvironment).
    """
    import datetime
    import socket

    import submitit
    import torch
    import torch.distributed as dist

    os.environ.pop("MASTER_PORT", None)  # take the job-id-derived port, not an inherited one
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all emulated nodes are this machine
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    job_env = submitit.JobEnvironment()
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        value = torch.tensor([float(dist_env.rank + 1)])
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        world = dist.get_world_size()
    finally:
        dist.destroy_process_group()
    return {
        "rank": dist_env.rank,
        "world_size": world,
        "sum": value.item(),
        "master_addr": dist_env.master_addr,
        "master_port": dist_env.master_port,
        "master_ip": socket.gethostbyname(dist_env.master_addr),
        "job_id": job_env.job_id,
        "hostnames": list(job_env.hostnames),
        "node": os.environ.get("SLURMD_NODENAME", ""),
    }


def sleep_for(seconds: float) -> float:
    """A job that just sleeps (to be cancelled)."""
    time.sleep(seconds)
    return seconds
