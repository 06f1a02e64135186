"""launch/submit.py: the plan and --dry-run (no SLURM), then the real local cluster (4 nodes x 2 CPUs):
every stage of a tiny run on 4 nodes, a training job requeued mid-run that resumes and ends equal to
a run without requeue, a failed stage whose dependants are cancelled, --cancel, and --cluster local.

The SLURM tests are skipped when the local cluster cannot be provided, unless KDSCALE_REQUIRE_SLURM=1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parent.parent
SUBMIT = REPO / "launch" / "submit.py"
TINY = REPO / "tests" / "configs" / "launch_tiny.yaml"
sys.path.insert(0, str(REPO))

from launch import jobs, plan as launch_plan, submit  # noqa: E402


def run_submit(*args, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SUBMIT), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    return proc


def record(run: Path) -> dict:
    return json.loads((run / "launch.json").read_text())


def events(folder: Path) -> list[dict]:
    path = folder / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def shared_outputs(run: Path) -> list[str]:
    """Overrides that point a new run at an earlier run's data, shards, teachers and soft labels."""
    return [f"data.demo.out_dir={run}/demo-data", f"shards.out_dir={run}/shards", f"teachers.out_dir={run}/teachers",
            f"softlabels.out_dir={run}/softlabels"]


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


def step_count(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    return sum('"kind": "step"' in line for line in metrics.read_text().splitlines())


def all_rows(cluster: SlurmCluster, job_id: str) -> list[dict]:
    """sacct rows of a job or of every task of an array (the fixture exported SLURM_CONF)."""
    from launch.scheduler import sacct_rows

    return sacct_rows([job_id])


# ---------------------------------------------------------------------------------------------
# Without SLURM
# ---------------------------------------------------------------------------------------------

def test_dry_run_prints_scripts_and_graph_and_submits_nothing(tmp_path):
    run = tmp_path / "dry"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env["PATH"] = str(Path(sys.executable).parent)  # no sbatch, srun or scontrol: nothing may be called
    proc = run_submit("--cfg", TINY, "--nodes", "4", "--tasks-per-node", "2", "--shard-tasks", "3",
                      "--cluster", "slurm", "--partition", "gpu", "--sbatch", "train:constraint=a100",
                      "--run-dir", run, "--dry-run", f"data.demo.out_dir={run}/demo-data", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert not run.exists(), "--dry-run must not write the run directory"
    assert "# dependency graph" in out
    assert "shards: array of 3" in out and "shards-verify: 1 job" in out and "after afterok:shards" in out
    assert "teachers: array of 2" in out and "after afterok:shards-verify" in out
    assert "train: 1 job, 4 nodes x 2 tasks" in out and f"kdscale train --cfg {run}/config.yaml --resume auto" in out
    scripts = out.split("# ---- ")[1:]
    expected = ["shards", "shards-verify", "teachers", "softlabels", "train"]
    expected += ["eval"] if "eval" in launch_plan.available_commands() else []
    assert [s.split(":")[0] for s in scripts] == expected
    train = next(s for s in scripts if s.startswith("train:"))
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=2", "#SBATCH --partition=gpu",
                 "#SBATCH --constraint=a100", "#SBATCH --requeue", "#SBATCH --kill-on-invalid-dep=yes",
                 "#SBATCH --signal=USR2@90", "#SBATCH --dependency='afterok:<softlabels>'",
                 f"#SBATCH --output={run}/slurm/train/%j_0_log.out", "--kill-on-bad-exit=1",
                 "-m submitit.core._submit"):
        assert line in train, line
    shards = next(s for s in scripts if s.startswith("shards:"))
    assert "#SBATCH --array=0-2%3" in shards and "constraint" not in shards


def test_sweep_shares_the_stages_the_key_cannot_affect(tmp_path):
    base, points, split = launch_plan.resolve_runs(str(TINY), [f"data.demo.out_dir={tmp_path}/demo-data"],
                                                   str(tmp_path / "run"), "students.0.mind.omega.image=0.5,1,2")
    assert split == "train" and len(points) == 3
    assert [p.cfg.students[0].mind.omega["image"] for p in points] == [0.5, 1.0, 2.0]
    for p in points:  # shards, teachers and soft labels are the base run's
        assert p.run_dir.parent == base.run_dir / "sweep"
        assert launch_plan.stage_dirs(p.cfg) == launch_plan.stage_dirs(base.cfg)
        assert Path(p.cfg.run.out_dir) == p.run_dir
    opts = launch_plan.Options(nodes=2, tasks_per_node=1)
    plan = launch_plan.build_plan(base, points, split, opts, commands=set(launch_plan.STAGES))
    assert [(j.name, len(j.tasks)) for j in plan.jobs] == [("shards", 1), ("teachers", 2), ("softlabels", 1),
                                                            ("train", 3), ("eval", 3)]
    assert plan.job("train").tasks[2].steps[0].argv[2] == str(points[2].cfg_path)
    # a data key changes everything from the shards on
    _, points, split = launch_plan.resolve_runs(str(TINY), [f"data.demo.out_dir={tmp_path}/demo-data"],
                                                str(tmp_path / "run"), "shards.max_samples_per_shard=10,30")
    assert split == "shards" and launch_plan.stage_dirs(points[0].cfg)["shards"] != \
        launch_plan.stage_dirs(points[1].cfg)["shards"]


def test_plan_errors_are_one_line(tmp_path):
    proc = run_submit("--cfg", TINY, "--gpus-per-node", "4", "--tasks-per-node", "2", "--dry-run", timeout=120)
    assert proc.returncode == 2 and "one task per GPU" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_submit("--cfg", TINY, "--stages", "train,bogus", "--dry-run", timeout=120)
    assert proc.returncode == 2 and "unknown stage" in proc.stderr
    proc = run_submit("--cfg", TINY, "--dry-run", "students.0.mind.omgea.image=2", timeout=120)
    assert proc.returncode == 2 and "did you mean" in proc.stderr


def test_option_parsing():
    assert submit.parse_time("90") == 90 and submit.parse_time("1:30:00") == 90 and submit.parse_time("1-0") == 1440
    assert submit.parse_time("2:30") == 3  # M:S rounds up
    assert submit.parse_sbatch(["exclusive", "mem=0", "train:constraint=a100"]) == \
        {"*": {"exclusive": True, "mem": "0"}, "train": {"constraint": "a100"}}
    assert jobs.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]


def test_layout_check_names_what_slurm_granted():
    layout = launch_plan.Layout(nodes=4, tasks_per_node=2)
    ok = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS": "8",
          "SLURM_TASKS_PER_NODE": "2(x4)"}
    jobs.check_layout(layout, ok)
    jobs.check_layout(layout, {})  # not a SLURM job: nothing to check
    with pytest.raises(jobs.LayoutError, match=r"granted 2 node\(s\), 4 task\(s\).*requested 4 nodes x 2 tasks"):
        jobs.check_layout(layout, {**ok, "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "4",
                                   "SLURM_TASKS_PER_NODE": "2(x2)"})
    with pytest.raises(jobs.LayoutError, match="srun"):
        jobs.check_layout(layout, {k: v for k, v in ok.items() if k != "SLURM_PROCID"})


def test_softlabels_dir_rule_matches_kdscale(tmp_path):
    from kdscale.distill.teacher_pass import softlabels_dir
    from kdscale.schema import load_config

    for extra in ([], [f"softlabels.out_dir={tmp_path}/elsewhere"]):
        cfg = load_config(TINY, [f"run.out_dir={tmp_path}/run", *extra])
        assert launch_plan.stage_dirs(cfg)["softlabels"] == softlabels_dir(cfg)


# ---------------------------------------------------------------------------------------------
# On the real local SLURM cluster
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_node_run(slurm_cluster, tmp_path_factory):
    """The whole pipeline of the tiny config on 4 nodes x 1 task (shards as a 2-task array)."""
    run = tmp_path_factory.mktemp("launch") / "run4"
    t0 = time.monotonic()
    proc = run_submit("--cfg", TINY, "--nodes", "4", "--tasks-per-node", "1", "--shard-tasks", "2", "--time", "10",
                      "--run-dir", run, "--wait", "--wait-timeout", "600", f"data.demo.out_dir={run}/demo-data")
    return run, proc, time.monotonic() - t0


@pytest.mark.slurm
@pytest.mark.slow
def test_four_nodes_run_every_stage(slurm_cluster: SlurmCluster, four_node_run):
    run, proc, seconds = four_node_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"4-node run of every stage: {seconds:.1f} s")
    rec = record(run)
    stages = rec["stages"]
    expected = ["shards", "shards-verify", "teachers", "softlabels", "train"]
    expected += ["eval"] if "eval" in launch_plan.available_commands() else []
    assert list(stages) == expected
    for line in ("run directory", "tail -f", f"sacct -j {','.join(s['job_id'] for s in stages.values())}"):
        assert line in proc.stdout, line
    for name, info in stages.items():
        rows = all_rows(slurm_cluster, info["job_id"])
        assert len(rows) == info["tasks"] and all(r["State"] == "COMPLETED" for r in rows), (name, rows)
        assert (run / "slurm" / name / f"{info['job_id']}_submission.sh").is_file()
    assert stages["teachers"]["dependency"] == f"afterok:{stages['shards-verify']['job_id']}"
    train = slurm_cluster.sacct(stages["train"]["job_id"])
    assert train["AllocNodes"] == "4" and len(set(slurm_cluster.hostnames(train["NodeList"]))) == 4
    jid = stages["train"]["job_id"]
    for rank in range(4):
        assert (run / "slurm" / "train" / f"{jid}_{rank}_log.out").is_file()
    assert sorted(e["rank"] for e in events(run / "slurm" / "train") if e["event"] == "start") == [0, 1, 2, 3]
    assert "4 process(es)" in (run / "slurm" / "train" / f"{jid}_0_log.out").read_text()
    assert (run / "config.yaml").is_file() and (run / "shards" / "train" / "index.json").is_file()
    assert json.loads((run / "students" / "mind" / "student.json").read_text())["best_metrics"]
    if "eval" in stages:
        assert list((run / "eval").glob("*/*/evaluation.json")) and (run / "report" / "report.html").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_training_resumes_and_matches_the_run_without_requeue(slurm_cluster: SlurmCluster, four_node_run,
                                                                        tmp_path):
    import torch

    ref, proc, _ = four_node_run
    assert proc.returncode == 0, "the 4-node run failed"
    run = tmp_path / "requeued"
    proc = run_submit("--cfg", TINY, "--nodes", "4", "--tasks-per-node", "1", "--stages", "train", "--time", "10",
                      "--run-dir", run, *shared_outputs(ref))
    assert proc.returncode == 0
    job = record(run)["stages"]["train"]["job_id"]
    metrics = run / "students" / "mind" / "metrics.jsonl"
    wait_until(lambda: step_count(metrics) >= 2, 300, "training did not reach step 2")
    slurm_cluster.run("scancel", "--signal=USR1", job)  # what SLURM sends before the limit (USR2) / on preemption
    # SLURM holds a requeued job for its credential lifetime (120 s by default); start it sooner (not at
    # once: a launch in the same second as the requeue is refused with "Job credential revoked")
    wait_until(lambda: slurm_cluster.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip() == "PENDING", 120,
               "the job was not requeued")
    time.sleep(3)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    assert slurm_cluster.wait_for_state(job, timeout=300) == "COMPLETED"

    kinds = [e["event"] for e in events(run / "slurm" / "train") if e["rank"] == 0]
    assert kinds == ["start", "preempted", "requeue", "start", "done"], kinds
    log = (run / "slurm" / "train" / f"{job}_0_log.err").read_text()
    out = (run / "slurm" / "train" / f"{job}_0_log.out").read_text()
    assert "requeued job" in out and "attempt 2 (requeued 1 time(s), --max-requeues 3)" in out
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and ", step " in resumed[0], log[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"kind": "step"' in line]
    assert steps == list(range(1, max(steps) + 1)), "a resumed run repeats or skips no step"
    assert "requeued 1x" in run_submit("--status", run, timeout=60).stdout

    # Same steps, same data order, same best epoch. One process resumes bit for bit; with 4 gloo ranks
    # the weights differ in the last digits (~1e-6): DDP rebuilds its gradient buckets on the first
    # step after a resume, which changes the all-reduce summation order.
    a = json.loads((ref / "students" / "mind" / "student.json").read_text())
    b = json.loads((run / "students" / "mind" / "student.json").read_text())
    assert a["best_epoch"] == b["best_epoch"] and len(a["history"]) == len(b["history"])
    assert b["best_metrics"] == pytest.approx(a["best_metrics"], abs=1e-6)
    wa = torch.load(ref / "students" / "mind" / "student.pt", weights_only=True)["model"]
    wb = torch.load(run / "students" / "mind" / "student.pt", weights_only=True)["model"]
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    print(f"requeued vs uninterrupted: max |weight difference| {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.slurm
@pytest.mark.slow
def test_failed_stage_cancels_its_dependants(slurm_cluster: SlurmCluster, tmp_path):
    run = tmp_path / "bad"
    proc = run_submit("--cfg", TINY, "--nodes", "2", "--stages", "shards,teachers,softlabels", "--time", "10",
                      "--run-dir", run, "--wait", "--wait-timeout", "300", "data.demo.out_dir=/dev/null/demo-data")
    assert proc.returncode == 1
    stages = record(run)["stages"]
    assert slurm_cluster.wait_for_state(stages["shards"]["job_id"]) == "FAILED"
    for name in ("teachers", "softlabels"):
        rows = all_rows(slurm_cluster, stages[name]["job_id"])
        assert rows and all(r["State"].startswith("CANCELLED") for r in rows), (name, rows)  # not left PENDING
    status = run_submit("--status", run, timeout=60).stdout
    assert "shards" in status and "FAILED: " in status and "/dev/null" in status
    assert "not run: its dependency teachers" in status and "DependencyNeverSatisfied" in status


@pytest.mark.slurm
@pytest.mark.slow   # ~24 s: waits for SLURM to run and cancel the jobs
def test_cancel_cancels_every_job_of_a_run(slurm_cluster: SlurmCluster, tmp_path):
    run = tmp_path / "cancelled"
    proc = run_submit("--cfg", TINY, "--stages", "shards,teachers,softlabels", "--time", "10", "--run-dir", run,
                      f"data.demo.out_dir={tmp_path}/demo-data")
    assert proc.returncode == 0
    stages = record(run)["stages"]
    proc = run_submit("--cancel", run, timeout=60)
    assert proc.returncode == 0 and "scancel" in proc.stdout
    for name, info in stages.items():
        assert slurm_cluster.wait_for_state(info["job_id"], timeout=60) == "CANCELLED", name
        assert all(r["State"].startswith("CANCELLED") for r in all_rows(slurm_cluster, info["job_id"]))


@pytest.mark.slurm
def test_sbatch_templates_build_and_verify_shards(slurm_cluster: SlurmCluster, tmp_path):
    """slurm/templates without submitit: a 2-task shards array (demo tree generated under a lock,
    exit status 3 of the first finisher is success), then shards_verify.sbatch afterok on it."""
    run = tmp_path / "tpl"
    run.mkdir()
    cfg = subprocess.run([sys.executable, "-m", "kdscale.cli", "config", "--cfg", str(TINY), f"run.out_dir={run}",
                          f"data.demo.out_dir={run}/demo-data"], capture_output=True, text=True, cwd=REPO, check=True)
    (run / "config.yaml").write_text(cfg.stdout)
    export = f"--export=ALL,CFG={run}/config.yaml,KDSCALE_ROOT={REPO},NUM_TASKS=2"
    common = ["--chdir", str(REPO), export, "--cpus-per-task=1", "--time=10"]
    shards = slurm_cluster.sbatch(REPO / "slurm" / "templates" / "shards.sbatch", *common, "--array=0-1",
                                  "-o", str(run / "shards-%A_%a.out"))
    verify = slurm_cluster.sbatch(REPO / "slurm" / "templates" / "shards_verify.sbatch", *common,
                                  f"--dependency=afterok:{shards}", "--kill-on-invalid-dep=yes",
                                  "-o", str(run / "verify-%j.out"))
    assert slurm_cluster.wait_for_state(verify, timeout=180) == "COMPLETED", (run / f"verify-{verify}.out").read_text()
    assert all(r["State"] == "COMPLETED" for r in all_rows(slurm_cluster, str(shards)))
    assert f"{run}/shards: OK" in (run / f"verify-{verify}.out").read_text()


# ---------------------------------------------------------------------------------------------
# --cluster local
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("launch-local") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    proc = run_submit("--cluster", "local", "--cfg", TINY, "--tasks-per-node", "2", "--time", "10", "--run-dir", run,
                      f"data.demo.out_dir={run}/demo-data", env=env)
    return run, proc


@pytest.mark.slow
def test_local_cluster_runs_the_same_stages(local_run):
    run, proc = local_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = record(run)
    assert rec["cluster"] == "local" and "train" in rec["stages"]
    for stage in ("shards", "teachers", "softlabels", "train"):
        assert f"  {stage}: done in" in proc.stdout
    train = run / "slurm" / "train"
    assert sorted(e["rank"] for e in events(train) if e["event"] == "start") == [0, 1]
    assert "2 process(es)" in next(train.glob("*_0_log.out")).read_text()
    assert (run / "students" / "mind" / "student.pt").is_file()
    if "eval" in rec["stages"]:
        assert (run / "report" / "report.html").is_file()


@pytest.mark.slow
def test_local_requeue_budget_is_enforced(local_run, tmp_path):
    """--max-requeues 0: a preemption notice ends the job with a clear message instead of a requeue."""
    ref, proc = local_run
    assert proc.returncode == 0
    run = tmp_path / "budget"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    cmd = [sys.executable, str(SUBMIT), "--cluster", "local", "--cfg", str(TINY), "--tasks-per-node", "2",
           "--stages", "train", "--max-requeues", "0", "--run-dir", str(run), *shared_outputs(ref)]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: step_count(run / "students" / "mind" / "metrics.jsonl") >= 2, 300, "no training step")
        ranks = [e["pid"] for e in events(run / "slurm" / "train") if e["event"] == "start"]
        for pid in ranks:
            os.kill(pid, signal.SIGUSR1)
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1, out + err
    assert "stage train FAILED" in err and "--max-requeues 0 reached" in err
    kinds = {e["event"] for e in events(run / "slurm" / "train")}
    assert {"preempted", "requeue_refused", "failed"} <= kinds
