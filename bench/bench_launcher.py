"""Launcher latency on the real local SLURM cluster (slurm/local-cluster, 4 nodes x 2 CPUs).

    python bench/bench_launcher.py [--nodes 4] [--repeats 2] [--out bench/results/launcher.json]

1. A whole tiny run (tests/configs/launch_tiny.yaml, every stage, 4 nodes x 1 task) through
   ``launch/submit.py`` (timed: submitting every job), then ``--status --wait``. Per stage, from
   sacct (1 s resolution) and the jobs' own events (ms): submit -> start (Start - Submit), the
   dependency hop (Start - End of the job it waited for: dependency release, scheduling, launch),
   process start-up (first ``start`` event of rank 0 - Start: srun, python, imports, unpickling
   the job), run time; and submit -> first training step of the student.
2. Training alone on those outputs (``--stages train``), ``--repeats`` times: submit -> first
   training step, split into submit -> job start, job start -> process start, process start ->
   first step (kdscale imports, model, data, DDP set-up).

Prints a table and writes the JSON. Starts the cluster if needed (root; as the tests do) and
stops it afterwards only if it started it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from launch.scheduler import sacct_rows  # noqa: E402
from slurm_cluster import SlurmCluster  # noqa: E402

TINY = REPO / "tests" / "configs" / "launch_tiny.yaml"


def _launcher(*args: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), *args], cwd=REPO, text=True,
                          capture_output=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"launch/submit.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def submit(*args: str, run: Path) -> tuple[float, float]:
    """Submit (launch/submit.py returns once every job is queued), then wait for the run to end.
    Returns (time before the launcher started, seconds the launcher took to submit)."""
    t0 = time.time()
    _launcher(*args, "--run-dir", str(run))
    submitted = time.time() - t0
    _launcher("--status", str(run), "--wait", "--wait-timeout", "1200")
    return t0, submitted


def ts(text: str) -> float | None:
    if not text or text in ("Unknown", "None"):
        return None
    return dt.datetime.fromisoformat(text).timestamp()


def first_event(folder: Path, kind: str, rank: int = 0) -> float | None:
    path = folder / "events.jsonl"
    if not path.is_file():
        return None
    times = [r["time"] for r in map(json.loads, path.read_text().splitlines())
             if r.get("event") == kind and r.get("rank") == rank]
    return min(times) if times else None


def first_step(run: Path) -> float | None:
    path = run / "students" / "mind" / "metrics.jsonl"
    if not path.is_file():
        return None
    times = [r["time"] for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "step"]
    return min(times) if times else None


def r(x: float | None, nd: int = 2):
    return None if x is None else round(x, nd)


def stage_table(run: Path, t_submit: float) -> dict:
    rec = json.loads((run / "launch.json").read_text())
    stages = rec["stages"]
    out = {}
    ends: dict[str, float] = {}
    for name, info in stages.items():
        rows = sacct_rows([info["job_id"]])
        start = min(ts(x["Start"]) for x in rows)
        end = max(ts(x["End"]) for x in rows)
        submit_t = min(ts(x["Submit"]) for x in rows)
        after = info.get("after") or []
        dep_end = max((ends[a] for a in after if a in ends), default=None)
        proc_start = first_event(run / "slurm" / name, "start")
        ends[name] = end
        out[name] = {"job_id": info["job_id"], "tasks": info["tasks"], "layout": info["layout"],
                     "states": sorted({x["State"] for x in rows}),
                     "submit_to_start_s": r(start - submit_t, 0), "dependency_hop_s": r(start - dep_end, 0)
                     if dep_end else None,
                     "process_start_s": r(proc_start - start) if proc_start else None,
                     "run_s": r(end - start, 0), "end_since_submit_s": r(end - t_submit, 1)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="train-only submissions (default 2)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "launcher.json"))
    args = ap.parse_args()

    cluster = SlurmCluster()
    started_here = not cluster.is_up()
    cluster.start()
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        del os.environ[key]
    os.environ.update(cluster.env)
    work = Path(tempfile.mkdtemp(prefix="kdscale-bench-launcher-"))
    common = ["--cfg", str(TINY), "--nodes", str(args.nodes), "--tasks-per-node", "1", "--time", "10"]
    try:
        run = work / "full"
        t0, submit_s = submit(*common, f"data.demo.out_dir={run}/demo-data", run=run)
        t_end = time.time()
        full = {"stages": stage_table(run, t0), "wall_s": r(t_end - t0, 1), "launcher_submit_s": r(submit_s),
                "submit_to_first_train_step_s": r(first_step(run) - t0, 1)}
        shared = [f"data.demo.out_dir={run}/demo-data", f"shards.out_dir={run}/shards",
                  f"teachers.out_dir={run}/teachers", f"softlabels.out_dir={run}/softlabels"]
        train_only = []
        for i in range(args.repeats):
            rrun = work / f"train{i}"
            t0, submit_s = submit(*common, "--stages", "train", *shared, run=rrun)
            info = stage_table(rrun, t0)["train"]
            jid = info["job_id"]
            row = sacct_rows([jid])[0]
            start, step = ts(row["Start"]), first_step(rrun)
            proc = first_event(rrun / "slurm" / "train", "start")
            train_only.append({"job_id": jid, "launcher_submit_s": r(submit_s), "submit_to_first_step_s": r(step - t0),
                               "submit_to_job_start_s": r(start - t0), "job_start_to_process_start_s": r(proc - start),
                               "process_start_to_first_step_s": r(step - proc), "train_job_run_s": info["run_s"]})
    finally:
        if started_here:
            cluster.stop()
    result = {
        "what": "launch/submit.py latency on the local SLURM cluster (tests/configs/launch_tiny.yaml)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "slurm": subprocess.run(["sbatch", "--version"], capture_output=True, text=True).stdout.strip()},
        "cluster": {"nodes": cluster.num_nodes, "cpus_per_node": cluster.cpus_per_node},
        "layout": f"{args.nodes} nodes x 1 task (softlabels, train)",
        "full_run": full,
        "train_only": train_only,
        "train_only_median": {k: r(statistics.median(x[k] for x in train_only))
                              for k in train_only[0] if k.endswith("_s")} if train_only else {},
        "notes": ["sacct times have 1 s resolution; process start and first step come from the jobs' "
                  "events.jsonl and the student's metrics.jsonl (ms)",
                  "all 4 emulated nodes share 2 real cores: run times are CPU-bound, latencies are the scheduler's"],
    }
    print(f"full run, every stage on {args.nodes} nodes: {full['wall_s']} s wall (launcher submitted "
          f"{len(full['stages'])} jobs in {full['launcher_submit_s']} s), submit -> first training step "
          f"{full['submit_to_first_train_step_s']} s")
    print(f"  {'stage':<14} {'tasks':>5} {'submit->start':>13} {'dep hop':>8} {'proc start':>10} {'run':>6}")
    for name, s in full["stages"].items():
        print(f"  {name:<14} {s['tasks']:>5} {s['submit_to_start_s']!s:>13} {s['dependency_hop_s']!s:>8} "
              f"{s['process_start_s']!s:>10} {s['run_s']!s:>6}")
    for x in train_only:
        print(f"train only (job {x['job_id']}, launcher {x['launcher_submit_s']} s): submit -> first step "
              f"{x['submit_to_first_step_s']} s = submit -> job "
              f"start {x['submit_to_job_start_s']} + job start -> process {x['job_start_to_process_start_s']} + "
              f"process -> first step {x['process_start_to_first_step_s']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
