#!/usr/bin/env python3
"""Run kdscale's pipeline as SLURM jobs (submitit), chained with dependencies, requeued on preemption.

    python launch/submit.py --cfg configs/mind.yaml --nodes 4 --gpus-per-node 8 --partition gpu --time 4:00:00
    python launch/submit.py --cfg configs/mind.yaml --nodes 2 --tasks-per-node 2 --dry-run     # print, submit nothing
    python launch/submit.py --cfg configs/mind.yaml --cluster local                            # same stages, locally
    python launch/submit.py --cfg configs/mind.yaml --stages train,eval --sweep students.0.mind.omega.image=0.5,1,2
    python launch/submit.py --status RUN [--wait]          python launch/submit.py --cancel RUN

Stages: shards (array of --shard-tasks) -> teachers (array, one per teacher) -> softlabels
(nodes x tasks-per-node ranks) -> train (nodes x tasks-per-node ranks) -> eval (1 task), each
`afterok` on the previous one; a failed stage cancels its dependants (--kill-on-invalid-dep=yes).
The run directory holds config.yaml (the resolved config), slurm/<job>/ (sbatch scripts, per-rank
logs, events.jsonl) and launch.json (job ids, graph, command line). See launch/README.md.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_VENV_PY = REPO / ".venv" / "bin" / "python"

if __name__ == "__main__":  # any python3 works: re-run under the repo's venv (kdscale + submitit live there)
    try:
        import kdscale  # noqa: F401
        import submitit  # noqa: F401
    except ImportError:
        if _VENV_PY.is_file() and Path(sys.prefix).resolve() != _VENV_PY.parent.parent.resolve():
            os.execv(str(_VENV_PY), [str(_VENV_PY), *sys.argv])
        raise
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402

from launch import scheduler  # noqa: E402
from launch.plan import STAGES, Options, Plan, PlanError, build_plan, resolve_runs  # noqa: E402

LAUNCH_JSON = "launch.json"


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

def parse_time(text: str) -> int:
    """Minutes from SLURM time syntax: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    text = str(text).strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(p) for p in text.split(":")] + [0, 0]
        h, m, s = parts[:3]
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts[:3]
    minutes = math.ceil(days * 1440 + h * 60 + m + s / 60)
    if minutes < 1:
        raise PlanError(f"--time {text!r}: must be at least one minute")
    return minutes


def parse_sbatch(items: list[str]) -> dict[str, dict]:
    """--sbatch [STAGE:]KEY[=VALUE] -> {"*" or stage: {key: value}}; no value = a flag."""
    out: dict[str, dict] = {}
    for item in items:
        scope, spec = "*", item
        head = item.split("=", 1)[0]
        if ":" in head and head.split(":", 1)[0] in (*STAGES, "shards-verify"):
            scope, spec = item.split(":", 1)
        key, _, value = spec.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise PlanError(f"--sbatch {item!r}: expected [STAGE:]KEY=VALUE")
        out.setdefault(scope, {})[key] = value if "=" in spec else True
    return out


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise PlanError(f"--env {item!r}: expected NAME=VALUE")
        env[key] = value
    return env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--cfg", help="kdscale YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (as for kdscale)")
    g = p.add_argument_group("layout")
    g.add_argument("--nodes", type=int, default=1, help="nodes of the softlabels and train jobs (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="ranks per node (CPU nodes; with GPUs it equals --gpus-per-node)")
    g.add_argument("--cpus-per-task", type=int, default=1, help="CPUs per task (OMP_NUM_THREADS; default 1)")
    g.add_argument("--shard-tasks", type=int, default=1, help="array tasks that write the shards (default 1)")
    g = p.add_argument_group("SLURM")
    g.add_argument("--cluster", choices=["slurm", "local", "debug"], default=None,
                   help="slurm; local = the same jobs as processes here; debug = in this process "
                        "(default: slurm when sbatch and a SLURM config are found, else local)")
    g.add_argument("--partition", default="")
    g.add_argument("--time", default="60", help="time limit per job: minutes or [D-]H:M[:S] (default 60)")
    g.add_argument("--account", default="")
    g.add_argument("--qos", default="")
    g.add_argument("--sbatch", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
                   help="extra sbatch option, e.g. --sbatch constraint=a100 --sbatch train:mem=200G (repeatable)")
    g.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="export in every job")
    g.add_argument("--max-requeues", type=int, default=3, help="requeues per job on preemption/time limit (3)")
    g.add_argument("--signal-delay", type=int, default=90,
                   help="seconds between SLURM's USR2 notice and the time limit (default 90)")
    g.add_argument("--save-grace", type=float, default=None,
                   help="seconds a training loop gets to save after the notice before the job requeues "
                        "anyway (default 2/3 of --signal-delay)")
    g.add_argument("--array-parallelism", type=int, default=256, help="array tasks running at once")
    g.add_argument("--python", default="", help="python of the jobs (default: the repo's .venv)")
    g = p.add_argument_group("run")
    g.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    g.add_argument("--sweep", default="", metavar="KEY=v1,v2,...",
                   help="one run directory per value (list items by index: students.0.mind.omega.image=0.5,1,2)")
    g.add_argument("--run-dir", default="", help="run directory (default: the config's run.out_dir)")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch scripts and the graph; submit nothing")
    g.add_argument("--force", action="store_true", help="submit even if the run has jobs still queued or running")
    g = p.add_argument_group("an existing run")
    g.add_argument("--status", metavar="RUN", help="print the state of a run's jobs")
    g.add_argument("--wait", action="store_true", help="after submitting (or with --status): wait for the run to end")
    g.add_argument("--wait-timeout", type=float, default=0, help="seconds; 0 = no limit")
    g.add_argument("--cancel", metavar="RUN", help="cancel every job of a run (the ids in RUN/launch.json)")
    return p


# ---------------------------------------------------------------------------------------------
# launch.json
# ---------------------------------------------------------------------------------------------

def read_record(run: str | Path) -> dict:
    path = Path(run) / LAUNCH_JSON
    if not path.is_file():
        raise PlanError(f"{path} does not exist: not a run directory written by launch/submit.py")
    return json.loads(path.read_text())


def write_record(run_dir: Path, submission: dict) -> Path:
    path = run_dir / LAUNCH_JSON
    record = json.loads(path.read_text()) if path.is_file() else {"submissions": []}
    record["submissions"] = [s for s in record.get("submissions", []) if s.get("id") != submission["id"]]
    record["submissions"].append(submission)
    record.update({k: submission[k] for k in ("run_dir", "cluster", "command_line", "submit_time", "stages",
                                              "graph", "sweep")})
    from kdscale.io.atomic import write_text_atomic

    return write_text_atomic(path, json.dumps(record, indent=2, default=str))


def all_job_ids(record: dict) -> list[str]:
    ids = []
    for submission in record.get("submissions", [record]):
        for stage in submission.get("stages", {}).values():
            if stage.get("job_id"):
                ids.append(str(stage["job_id"]))
    return ids


def _git() -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def _submission(plan: Plan, args, cluster: str, time_min: int) -> dict:
    return {"id": f"{time.time():.3f}", "run_dir": str(plan.run_dir), "cluster": cluster,
            "command_line": [sys.executable, *sys.argv], "submit_time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "submit_unix": round(time.time(), 3), "git": _git(), "max_requeues": args.max_requeues,
            "time_min": time_min, "config": str(plan.base.cfg_path),
            "sweep": {"spec": args.sweep, "first_stage": plan.split,
                      "points": [{"label": p.label, "run_dir": str(p.run_dir)} for p in plan.points]}
            if args.sweep else None,
            "notes": plan.notes,
            "stages": {job.name: {"stage": job.stage, "job_id": None, "array": job.array, "tasks": len(job.tasks),
                                  "labels": [t.label for t in job.tasks], "after": job.after,
                                  "layout": asdict(job.layout), "folder": str(plan.run_dir / "slurm" / job.name)}
                       for job in plan.jobs},
            "graph": plan.graph_lines()}


# ---------------------------------------------------------------------------------------------
# Submitting
# ---------------------------------------------------------------------------------------------

def _payloads(plan: Plan, job, cluster: str, args) -> list:
    from launch.jobs import JobPayload

    grace = args.save_grace if args.save_grace is not None else max(10.0, args.signal_delay * 2 / 3)
    folder = str(plan.run_dir / "slurm" / job.name)
    return [JobPayload(job, task, i, cluster, folder, args.max_requeues, grace) for i, task in enumerate(job.tasks)]


def _params(plan: Plan, job, args, time_min: int, dependency: str) -> dict:
    sbatch = parse_sbatch(args.sbatch)
    extra = {**sbatch.get("*", {}), **sbatch.get(job.stage, {}), **sbatch.get(job.name, {})}
    return scheduler.slurm_parameters(job, job_name=f"kd-{plan.run_dir.name}-{job.name}", time_min=time_min,
                                      signal_delay_s=args.signal_delay, partition=args.partition,
                                      account=args.account, qos=args.qos, dependency=dependency, extra=extra,
                                      env=parse_env(args.env), array_parallelism=args.array_parallelism)


def dry_run(plan: Plan, args, cluster: str, time_min: int, python: str) -> int:
    print(f"# kdscale launch --dry-run: nothing is submitted or written (cluster: {cluster})")
    print(f"# run directory: {plan.run_dir}")
    for point in plan.points if plan.points[0] is not plan.base else []:
        print(f"#   sweep point {point.label}: {point.run_dir}")
    for note in plan.notes:
        print(f"# note: {note}")
    print("\n# dependency graph")
    for line in plan.graph_lines():
        print(f"#   {line}")
    for job in plan.jobs:
        folder = str(plan.run_dir / "slurm" / job.name)
        dependency = ",".join(f"afterok:<{a}>" for a in job.after)
        script = scheduler.sbatch_script(job, folder, _params(plan, job, args, time_min, dependency), python)
        print(f"\n# ---- {job.name}: {folder}/<job id>_submission.sh " + "-" * 20)
        print(script.rstrip())
    return 0


def prepare_run_dir(plan: Plan) -> None:
    from kdscale.config import dump

    for point in {id(p): p for p in [plan.base, *plan.points]}.values():
        point.run_dir.mkdir(parents=True, exist_ok=True)
        dump(point.cfg, point.cfg_path)
    for job in plan.jobs:
        (plan.run_dir / "slurm" / job.name).mkdir(parents=True, exist_ok=True)


def submit_slurm(plan: Plan, args, time_min: int, python: str) -> dict:
    record_path = plan.run_dir / LAUNCH_JSON
    if record_path.is_file() and not args.force:
        active = scheduler.squeue_active(all_job_ids(json.loads(record_path.read_text())))
        if active:
            raise PlanError(f"run {plan.run_dir} still has jobs queued or running "
                            f"({', '.join(f'{i} {s}' for i, s in active)}): --cancel it first, or --force")
    prepare_run_dir(plan)
    submission = _submission(plan, args, "slurm", time_min)
    ids: dict[str, str] = {}
    for job in plan.jobs:
        folder = str(plan.run_dir / "slurm" / job.name)
        dependency = ",".join(f"afterok:{ids[a]}" for a in job.after)
        params = _params(plan, job, args, time_min, dependency)
        try:
            ids[job.name] = scheduler.submit_slurm(job, folder, params, python, _payloads(plan, job, "slurm", args))
        except Exception as exc:  # e.g. sbatch rejects a partition/account: take back what was submitted
            if ids:
                scheduler.scancel(ids.values())
            raise PlanError(f"submitting {job.name} failed ({str(exc).strip()[-400:]})"
                            + (f"; cancelled the jobs already submitted ({', '.join(ids.values())})" if ids else ""))
        submission["stages"][job.name]["job_id"] = ids[job.name]
        submission["stages"][job.name]["dependency"] = dependency
        write_record(plan.run_dir, submission)  # a partial submission is still cancellable
    submission["graph"] = plan.graph_lines(ids)
    write_record(plan.run_dir, submission)
    return submission


def print_submitted(plan: Plan, submission: dict) -> None:
    run = plan.run_dir
    print(f"kdscale launch: run directory {run}")
    for note in plan.notes:
        print(f"  note: {note}")
    width = max(len(j.name) for j in plan.jobs)
    for job in plan.jobs:
        info = submission["stages"][job.name]
        kind = f"array 0-{len(job.tasks) - 1}" if job.array else "job"
        after = info.get("dependency") or "-"
        print(f"  {job.name:<{width}}  {info['job_id']:>8}  {kind:<10} {job.layout.describe():<34} {after}")
    print(f"config:  {run / 'config.yaml'}")
    print(f"record:  {run / LAUNCH_JSON}")
    last = plan.jobs[-1]
    train = next((j for j in plan.jobs if j.stage == "train"), last)
    jid = submission["stages"][train.name]["job_id"]
    log = f"{jid}_0_0_log.out" if train.array else f"{jid}_0_log.out"
    ids = ",".join(submission["stages"][j.name]["job_id"] for j in plan.jobs)
    print(f"follow:  tail -f {run / 'slurm' / train.name / log}      (rank r: {jid}_<r>_log.out / .err)")
    print(f"         sacct -j {ids} -X -o JobID,JobName%32,State,Elapsed,ExitCode,Reason")
    here = "python launch/submit.py"
    print(f"status:  {here} --status {run}   (add --wait to block until the run ends)")
    print(f"cancel:  {here} --cancel {run}")


def run_local(plan: Plan, args, cluster: str, time_min: int, python: str) -> int:
    """--cluster local|debug: the same jobs, one after the other, as processes here (or in-process)."""
    import submitit

    from launch.jobs import StageJob

    prepare_run_dir(plan)
    submission = _submission(plan, args, cluster, time_min)
    write_record(plan.run_dir, submission)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.cpus_per_task))
    os.environ.update(parse_env(args.env))
    print(f"kdscale launch ({cluster}): run directory {plan.run_dir}")
    for note in plan.notes:
        print(f"  note: {note}")
    for job in plan.jobs:
        folder = plan.run_dir / "slurm" / job.name
        pids = []
        for payload in _payloads(plan, job, cluster, args):
            if cluster == "debug":
                executor = submitit.DebugExecutor(folder=str(folder))
            else:
                executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=args.max_requeues, python=python)
                executor.update_parameters(timeout_min=time_min, tasks_per_node=job.layout.ntasks,
                                           gpus_per_node=job.layout.gpus_per_node,
                                           signal_delay_s=args.signal_delay)
            started = time.time()
            with scheduler.clean_slurm_env():  # local ranks must not mistake an enclosing allocation for theirs
                handle = executor.submit(StageJob(payload))
            pids.append(str(handle.job_id))
            print(f"  {job.name}: {payload.task.label} ({job.layout.ntasks} process(es), id {handle.job_id}, "
                  f"logs {folder}/{handle.job_id}_<rank>_log.out)", flush=True)
            try:
                handle.results()
            except Exception as exc:  # noqa: BLE001 - report the stage's own message, then stop
                submission["stages"][job.name]["job_id"] = ",".join(pids)
                write_record(plan.run_dir, submission)
                message = _failure_message(folder, str(handle.job_id)) or str(exc).strip().splitlines()[-1]
                rest = [j.name for j in plan.jobs[plan.jobs.index(job) + 1:]]
                print(f"kdscale launch: stage {job.name} FAILED: {message}\n  log: {folder}/{handle.job_id}_0_log.err"
                      + (f"\n  not run (dependants): {', '.join(rest)}" if rest else ""), file=sys.stderr)
                return 1
            print(f"  {job.name}: done in {time.time() - started:.1f} s", flush=True)
        submission["stages"][job.name]["job_id"] = ",".join(pids)
        write_record(plan.run_dir, submission)
    print(f"kdscale launch ({cluster}): all stages done; outputs in {plan.run_dir}")
    return 0


# ---------------------------------------------------------------------------------------------
# --status / --wait / --cancel
# ---------------------------------------------------------------------------------------------

def _failure_message(folder: Path, job_id: str) -> str:
    events = Path(folder) / "events.jsonl"
    if not events.is_file():
        return ""
    message = ""
    for line in events.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") in ("failed", "requeue_refused") and str(rec.get("job", "")).split("_")[0] == \
                str(job_id).split("_")[0]:
            message = rec.get("message") or f"requeue refused ({rec.get('reason')})"
    return message


def _requeues(folder: Path, job_id: str) -> int:
    events = Path(folder) / "events.jsonl"
    if not events.is_file():
        return 0
    n = 0
    for line in events.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        n += rec.get("event") == "requeue" and str(rec.get("job", "")).split("_")[0] == str(job_id)
    return n


def stage_status(record: dict) -> list[dict]:
    """Per stage: state (worst over its array tasks), exit code, and a message for failures."""
    stages = record.get("stages", {})
    ids = [s["job_id"] for s in stages.values() if s.get("job_id")]
    by_job: dict[str, list[dict]] = {}
    for row in scheduler.sacct_rows(ids):
        by_job.setdefault(scheduler.base_id(row["JobID"]), []).append(row)
    order = ["FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "PREEMPTED", "RUNNING", "REQUEUED",
             "PENDING", "COMPLETED"]
    out = []
    names = {s.get("job_id"): n for n, s in stages.items()}
    for name, info in stages.items():
        jid = str(info.get("job_id") or "")
        rows = by_job.get(jid, [])
        states = [r["State"].split()[0] for r in rows] or ["UNKNOWN"]
        state = min(states, key=lambda s: order.index(s) if s in order else len(order))
        if state == "UNKNOWN" and not jid:
            state = "NOT SUBMITTED"
        entry = {"name": name, "job_id": jid, "state": state, "tasks": len(rows),
                 "counts": {s: states.count(s) for s in sorted(set(states))},
                 "exit_code": next((r["ExitCode"] for r in rows if r["State"].split()[0] == state), ""),
                 "requeues": _requeues(Path(info["folder"]), jid), "message": ""}
        if state in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
            entry["message"] = _failure_message(Path(info["folder"]), jid) or \
                f"see {info['folder']}/{jid}_*_log.err"
        elif state == "CANCELLED":
            reason = next((r["Reason"] for r in rows if r["State"].startswith("CANCELLED")), "")
            deps = [names.get(a) or a for a in info.get("after", [])]
            dep_ids = [stages[a]["job_id"] for a in info.get("after", []) if a in stages]
            if reason.startswith("Dependency") or (not any(r["Start"] not in ("", "None", "Unknown") for r in rows)
                                                   and dep_ids):
                entry["message"] = (f"not run: its dependency {', '.join(deps)} (job {', '.join(dep_ids)}) did not "
                                    f"complete (DependencyNeverSatisfied; cancelled by --kill-on-invalid-dep)")
            else:
                entry["message"] = "cancelled (scancel / --cancel)"
        out.append(entry)
    return out


def print_status(record: dict) -> bool:
    print(f"run {record.get('run_dir')} (submitted {record.get('submit_time')}, cluster {record.get('cluster')})")
    if record.get("cluster") != "slurm":
        for name, info in record.get("stages", {}).items():
            print(f"  {name}: process id(s) {info.get('job_id') or '-'}; logs and events in {info['folder']}")
        return True
    entries = stage_status(record)
    width = max((len(e["name"]) for e in entries), default=5)
    for e in entries:
        counts = "" if e["tasks"] <= 1 else " (" + ", ".join(f"{n} {s}" for s, n in e["counts"].items()) + ")"
        requeues = f", requeued {e['requeues']}x" if e["requeues"] else ""
        line = f"  {e['name']:<{width}}  {e['job_id']:>8}  {e['state']}{counts}{requeues}"
        if e["message"]:
            line += f": {e['message']}"
        print(line)
    return all(e["state"] == "COMPLETED" for e in entries)


def wait_for(record: dict, timeout: float = 0, poll: float = 2.0) -> bool:
    ids = [s["job_id"] for s in record.get("stages", {}).values() if s.get("job_id")]
    deadline = time.time() + timeout if timeout else None
    last: dict[str, str] = {}
    while True:
        rows = scheduler.sacct_rows(ids)
        states = {r["JobID"]: r["State"].split()[0] for r in rows}
        for jid, state in sorted(states.items()):
            if last.get(jid) != state:
                print(f"  {time.strftime('%H:%M:%S')} {jid}: {state}", flush=True)
        last = states
        known = {scheduler.base_id(j) for j in states}
        if set(map(str, ids)) <= known and all(s in scheduler.TERMINAL for s in states.values()):
            time.sleep(1.0)  # let the accounting records settle
            return print_status(record)
        if deadline and time.time() > deadline:
            print(f"--wait-timeout {timeout:.0f} s reached", file=sys.stderr)
            print_status(record)
            return False
        time.sleep(poll)


def cancel(run: str) -> int:
    record = read_record(run)
    if record.get("cluster") != "slurm":
        print(f"run {run} ran with --cluster {record.get('cluster')} in the foreground: stop it with Ctrl-C")
        return 1
    ids = all_job_ids(record)
    proc = scheduler.scancel(ids)
    print(f"scancel {' '.join(ids)}" + (f": {proc.stderr.strip()}" if proc.returncode else ""))
    return 0 if proc.returncode == 0 else 1


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cancel:
            return cancel(args.cancel)
        if args.status:
            record = read_record(args.status)
            ok = wait_for(record, args.wait_timeout) if args.wait else print_status(record)
            return 0 if ok else 1
        if not args.cfg:
            raise PlanError("--cfg is required (or --status RUN / --cancel RUN)")
        return launch(args)
    except PlanError as exc:
        print(f"launch/submit.py: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # kdscale.config.ConfigError names the key and the file
        print(f"launch/submit.py: error: {exc}", file=sys.stderr)
        return 2


def launch(args) -> int:
    cluster = args.cluster
    if cluster is None:
        ok, why = scheduler.slurm_available()
        cluster = "slurm" if ok else "local"
        if not ok:
            print(f"kdscale launch: no SLURM found ({why}): running locally (--cluster local)", file=sys.stderr)
    elif cluster == "slurm" and not args.dry_run:
        ok, why = scheduler.slurm_available()
        if not ok:
            raise PlanError(f"--cluster slurm: SLURM is not reachable ({why})")
    time_min = parse_time(args.time)
    if time_min * 60 <= args.signal_delay:
        raise PlanError(f"--time {args.time} is not longer than --signal-delay {args.signal_delay} s: SLURM would "
                        f"send the preemption notice as the jobs start")
    tasks_per_node = args.tasks_per_node or args.gpus_per_node or 1
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) or STAGES
    opts = Options(nodes=args.nodes, tasks_per_node=tasks_per_node, gpus_per_node=args.gpus_per_node,
                   cpus_per_task=args.cpus_per_task, shard_tasks=args.shard_tasks, stages=stages,
                   explicit_stages=bool(args.stages))
    if cluster in ("local", "debug") and args.nodes > 1:
        print(f"kdscale launch: --cluster {cluster}: {args.nodes} nodes x {tasks_per_node} tasks run as "
              f"{args.nodes * tasks_per_node} local processes", file=sys.stderr)
    if cluster == "debug":
        opts.nodes, opts.tasks_per_node, opts.gpus_per_node = 1, 1, min(1, args.gpus_per_node)
    base, points, split = resolve_runs(args.cfg, args.overrides, args.run_dir, args.sweep)
    plan = build_plan(base, points, split, opts)
    python = args.python or scheduler.job_python()
    if args.dry_run:
        return dry_run(plan, args, cluster, time_min, python)
    if cluster != "slurm":
        return run_local(plan, args, cluster, time_min, python)
    submission = submit_slurm(plan, args, time_min, python)
    print_submitted(plan, submission)
    if args.wait:
        return 0 if wait_for(submission, args.wait_timeout) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
