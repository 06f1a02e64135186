"""End-to-end tests of the real single-machine SLURM cluster (slurm/local-cluster) and submitit on it.

Skipped when the cluster cannot be provided (not root / no apt-get), unless KDSCALE_REQUIRE_SLURM=1.
"""
from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, gloo_allreduce, sleep_for, slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slurm


def _alive(pid: int) -> bool:
    """A process exists and is not a zombie (a stopped daemon may wait a moment for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_sbatch_two_nodes_srun(slurm_cluster: SlurmCluster, tmp_path: Path):
    script = "\n".join([
        "#!/bin/bash",
        "#SBATCH --job-name=kdscale-srun-test",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --time=5",
        "srun bash -c 'echo \"node=$SLURMD_NODENAME host=$(hostname) rank=$SLURM_PROCID\"'",
        "",
    ])
    idle = not slurm_cluster.run("squeue", "-h").stdout.strip()
    job_id = slurm_cluster.sbatch(script, "--output", str(tmp_path / "%j.out"), cwd=tmp_path)
    assert slurm_cluster.wait_for_state(job_id, timeout=60) == "COMPLETED"
    row = slurm_cluster.sacct(job_id)
    assert row is not None and row["ExitCode"] == "0:0", row
    allocated = slurm_cluster.hostnames(row["NodeList"])
    assert len(allocated) == 2 and set(allocated) <= set(slurm_cluster.nodes), allocated

    lines = (tmp_path / f"{job_id}.out").read_text().split("\n")
    seen = sorted(m.group(1) for line in lines if (m := re.match(r"node=(\S+) host=\S+ rank=\d", line)))
    assert seen == sorted(allocated), lines
    if idle:  # on an idle cluster the scheduler picks the first two nodes
        assert seen == ["n1", "n2"], seen


def test_submitit_gloo_allreduce_two_nodes(slurm_cluster: SlurmCluster, tmp_path: Path):
    executor = slurm_cluster.submitit_executor(tmp_path / "submitit", nodes=2, tasks_per_node=1, cpus_per_task=1,
                                               timeout_min=5, name="kdscale-gloo-test")
    job = executor.submit(gloo_allreduce)
    slurm_cluster.job_ids.append(int(job.job_id))
    results = job.results()  # one dict per task
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["world_size"] == 2 and r["sum"] == 3.0, r
        # MASTER_ADDR = first node of the job, resolving to this machine (the /etc/hosts lines of start.sh)
        assert r["master_addr"] == r["hostnames"][0] and r["master_ip"] == "127.0.0.1", r
        assert r["master_port"] == random.Random(job.job_id).randint(20000, 60000), r
    assert sorted(r["node"] for r in results) == sorted(results[0]["hostnames"])
    assert len(set(results[0]["hostnames"])) == 2
    assert slurm_cluster.wait_for_state(job.job_id, timeout=30) == "COMPLETED"


def test_cancelled_job(slurm_cluster: SlurmCluster, tmp_path: Path):
    import submitit

    executor = slurm_cluster.submitit_executor(tmp_path / "submitit", nodes=1, tasks_per_node=1, timeout_min=5,
                                               name="kdscale-cancel-test")
    job = executor.submit(sleep_for, 300)
    slurm_cluster.job_ids.append(int(job.job_id))
    slurm_cluster.wait_for_state(job.job_id, {"RUNNING"}, timeout=30)
    slurm_cluster.scancel(job.job_id)
    assert slurm_cluster.wait_for_state(job.job_id, timeout=30) == "CANCELLED"
    t0 = time.monotonic()
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()
    elapsed = time.monotonic() - t0
    assert elapsed < 45, f"result() of a cancelled job took {elapsed:.1f}s to raise"
    assert job.state.startswith("CANCELLED"), job.state


def test_stop_then_start_again(slurm_cluster: SlurmCluster, tmp_path: Path):
    """stop.sh removes daemons and /etc/hosts lines; start.sh brings it back with job ids continuing."""
    state = slurm_cluster.state_dir
    pid_files = [state / "run" / "slurmctld.pid", state / "run" / "slurmdbd.pid",
                 state / "mariadb" / "mariadbd.pid", state / "munge" / "munged.pid",
                 *(state / "run" / f"slurmd.{n}.pid" for n in slurm_cluster.nodes)]
    pids = [int(p.read_text().strip()) for p in pid_files]
    tag = f"# kdscale-local-slurm[{state}]"
    assert Path("/etc/hosts").read_text().count(tag) == len(slurm_cluster.nodes)
    last_id = max(slurm_cluster.job_ids, default=0)

    slurm_cluster.stop()
    assert not any(_alive(pid) for pid in pids)
    assert tag not in Path("/etc/hosts").read_text()
    assert slurm_cluster.run("scontrol", "ping", check=False, timeout=30).returncode != 0  # (sinfo retries 9 s)
    slurm_cluster.stop()  # idempotent

    slurm_cluster.start()
    assert Path("/etc/hosts").read_text().count(tag) == len(slurm_cluster.nodes)
    nodes = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
    assert sorted(line.split()[0] for line in nodes if line.endswith("idle")) == slurm_cluster.nodes
    job_id = slurm_cluster.sbatch("#!/bin/bash\nsrun true\n", "--output", str(tmp_path / "%j.out"), "-t", "5")
    assert job_id > last_id, "job ids must keep increasing across a restart"
    assert slurm_cluster.wait_for_state(job_id, timeout=60) == "COMPLETED"
