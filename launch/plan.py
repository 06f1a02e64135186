"""The launcher's plan: which jobs run which ``kdscale`` commands, with which layout, in which order.

Pure data and config resolution (no scheduler, no torch): ``--dry-run`` prints a plan,
``launch/submit.py`` submits it, ``launch/jobs.py`` runs one task of it inside a job.

Stages, in order (each a SLURM job; ``after`` = the job that must end COMPLETED first)::

    shards         array of T tasks: kdscale shards --task-index i --num-tasks T (exit 3 = "my part is
                   done, others are missing": success for an array task); with T > 1 a 1-task
                   job "shards-verify" then finalizes the set and runs kdscale verify
    teachers       array, one task per teacher: kdscale teachers --index i (a trained teacher is skipped;
                   a requeued task resumes from the teacher's latest checkpoint)
    softlabels     one job, nodes x tasks-per-node ranks: kdscale softlabels (+ kdscale verify on rank 0)
    train          one job, nodes x tasks-per-node ranks: kdscale train --resume auto
    eval           one job, one task: kdscale eval --run RUN

A sweep (``--sweep KEY=v1,v2``) gives one run directory per value. Stages that the key cannot
affect run once, in the base run directory, and the sweep points read their outputs; from the
first stage the key affects on, every stage is an array with one task per value (see
``first_affected_stage``).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

STAGES = ("shards", "teachers", "softlabels", "train", "eval")
EXIT_PREEMPTED = 75          # kdscale.engine.signals.EXIT_PREEMPTED: checkpoint saved, requeue me
EXIT_SHARDS_PARTIAL = 3      # kdscale shards: this task's shards are done, other tasks' are missing

# The first stage that reads each top-level config section. A swept key affects that stage and
# every later one; the stages before it are shared by all sweep points. Sections not listed
# (students, ...) are read from the train stage on.
_FIRST_READER = {"run": "shards", "data": "shards", "shards": "shards", "loader": "teachers",
                 "teachers": "teachers", "softlabels": "softlabels", "eval": "eval"}


class PlanError(ValueError):
    """A launcher option or config problem, reported as one line before anything is submitted."""


@dataclass
class Layout:
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1

    @property
    def ntasks(self) -> int:
        return self.nodes * self.tasks_per_node

    def describe(self) -> str:
        text = f"{self.nodes} node{'s' if self.nodes > 1 else ''} x {self.tasks_per_node} task" \
               f"{'s' if self.tasks_per_node > 1 else ''}"
        if self.gpus_per_node:
            text += f", {self.gpus_per_node} GPU{'s' if self.gpus_per_node > 1 else ''}/node"
        return text + f", {self.cpus_per_task} CPU{'s' if self.cpus_per_task > 1 else ''}/task"


@dataclass
class Step:
    """One kdscale command run inside a task (in-process, ``kdscale.cli.main(argv)``)."""
    argv: list[str]
    ok: tuple[int, ...] = (0,)      # exit statuses that mean success
    rank0_only: bool = False        # e.g. verify: one check per job, not one per rank
    resume_dir: str = ""            # add `--resume latest` when this checkpoints/ folder holds one ...
    done_file: str = ""             # ... and this file (the finished teacher) does not exist yet

    def command(self) -> str:
        return shlex.join(["kdscale", *self.argv])


@dataclass
class Task:
    """What one array element (or the single task list of a job) runs."""
    label: str
    run_dir: str
    steps: list[Step]
    demo_data: str = ""             # config path: generate its demo tree under a lock first


@dataclass
class JobSpec:
    name: str                       # unique in the plan; also the folder RUN/slurm/<name>
    stage: str
    layout: Layout
    tasks: list[Task]               # more than one: a job array
    after: list[str] = field(default_factory=list)

    @property
    def array(self) -> bool:
        return len(self.tasks) > 1


@dataclass
class RunPoint:
    """One run directory: the base run, or one sweep value."""
    run_dir: Path
    cfg: object                     # kdscale.schema.Config
    overrides: list[str]
    label: str = ""                 # "" for the base run, "key=value" for a sweep point

    @property
    def cfg_path(self) -> Path:
        return self.run_dir / "config.yaml"


@dataclass
class Plan:
    run_dir: Path
    base: RunPoint
    points: list[RunPoint]          # the sweep points, or [base]
    split: str                      # the first per-point stage (with a sweep)
    jobs: list[JobSpec]
    notes: list[str] = field(default_factory=list)

    def job(self, name: str) -> JobSpec:
        return next(j for j in self.jobs if j.name == name)

    def graph_lines(self, ids: Optional[dict] = None) -> list[str]:
        ids = ids or {}
        lines = []
        for job in self.jobs:
            kind = f"array of {len(job.tasks)}" if job.array else "1 job"
            after = ", ".join(f"afterok:{a}" + (f" ({ids[a]})" if a in ids else "") for a in job.after) or "-"
            jid = f" [{ids[job.name]}]" if job.name in ids else ""
            lines.append(f"{job.name}{jid}: {kind}, {job.layout.describe()}; after {after}")
            for task in job.tasks:
                for step in task.steps:
                    lines.append(f"    {task.label}: {step.command()}" + ("  (rank 0)" if step.rank0_only else ""))
        return lines


# ---------------------------------------------------------------------------------------------
# Config resolution: the base run and the sweep points
# ---------------------------------------------------------------------------------------------

def first_affected_stage(key: str) -> str:
    return _FIRST_READER.get(key.split(".")[0], "train")


def parse_sweep(text: str) -> tuple[str, list[str]]:
    if "=" not in text:
        raise PlanError(f"--sweep {text!r} must look like KEY=v1,v2,...")
    key, raw = text.split("=", 1)
    key, values = key.strip(), [v.strip() for v in raw.split(",")]
    if not key or not all(values) or len(values) < 1:
        raise PlanError(f"--sweep {text!r}: need a key and at least one non-empty value")
    if key in ("run.out_dir", "run.name"):
        raise PlanError(f"--sweep over {key} makes no sense: every sweep point gets its own run directory")
    if len(set(values)) != len(values):
        raise PlanError(f"--sweep {text!r}: repeated values")
    return key, values


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)[:60]


def _load(cfg_file: str, overrides: list[str]):
    from kdscale.schema import load_config

    return load_config(cfg_file, overrides)


def stage_dirs(cfg) -> dict[str, Path]:
    """Where the stages that later stages read write their outputs (kdscale's own rules), made
    absolute against the working directory, which is also the jobs' working directory."""
    from kdscale.data.shards import shards_out_dir
    from kdscale.distill.teachers import teachers_dir

    # = kdscale.distill.teacher_pass.softlabels_dir (that module imports torch; tests check both agree)
    soft = Path(cfg.softlabels.out_dir or Path(cfg.run.out_dir) / "softlabels")
    dirs = {"shards": Path(shards_out_dir(cfg)), "teachers": Path(teachers_dir(cfg)), "softlabels": soft}
    return {k: v.absolute() for k, v in dirs.items()}


def resolve_runs(cfg_file: str, overrides: list[str], run_dir: str = "",
                 sweep: str = "") -> tuple[RunPoint, list[RunPoint], str]:
    """(base run, sweep points or [base], first per-point stage). Every config is loaded and
    validated here, so a bad key or value stops the launcher before anything is submitted."""
    overrides = list(overrides)
    if run_dir:
        overrides.append(f"run.out_dir={Path(run_dir).resolve()}")
    base_cfg = _load(cfg_file, overrides)
    base = RunPoint(Path(base_cfg.run.out_dir).resolve(), base_cfg, overrides)
    if not sweep:
        return base, [base], STAGES[0]
    key, values = parse_sweep(sweep)
    split = first_affected_stage(key)
    shared = STAGES[:STAGES.index(split)]
    dirs = stage_dirs(base_cfg)
    share = [f"{s}.out_dir={dirs[s]}" for s in shared if s in dirs]
    leaf = ".".join(key.split(".")[-2:])
    points = []
    for i, value in enumerate(values):
        point_dir = base.run_dir / "sweep" / f"{i}-{_slug(f'{leaf}={value}')}"
        point_overrides = [*overrides, f"{key}={value}", f"run.out_dir={point_dir}", *share]
        points.append(RunPoint(point_dir, _load(cfg_file, point_overrides), point_overrides, f"{key}={value}"))
    return base, points, split


def available_commands() -> set[str]:
    """The subcommands of this checkout's ``kdscale`` CLI (train/eval may not exist yet)."""
    import argparse

    from kdscale.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------

@dataclass
class Options:
    """The layout-related launcher options (see launch/submit.py --help)."""
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    shard_tasks: int = 1
    stages: tuple[str, ...] = STAGES
    explicit_stages: bool = False   # --stages given: a missing command is an error, not a note


def _task_label(point: RunPoint, text: str) -> str:
    return f"{text} [{point.label}]" if point.label else text


def _shards_jobs(points: list[RunPoint], opts: Options) -> list[JobSpec]:
    T = opts.shard_tasks
    one = Layout(1, 1, 0, opts.cpus_per_task)
    tasks = []
    for point in points:
        cfg = str(point.cfg_path)
        demo = cfg if point.cfg.data.source == "demo" else ""
        shards_dir = str(stage_dirs(point.cfg)["shards"])
        for i in range(T):
            steps = [Step(["shards", "--cfg", cfg, "--task-index", str(i), "--num-tasks", str(T), "--no-progress"],
                          ok=(0, EXIT_SHARDS_PARTIAL) if T > 1 else (0,))]
            if T == 1:
                steps.append(Step(["verify", shards_dir]))
            tasks.append(Task(_task_label(point, f"shards {i}/{T}"), str(point.run_dir), steps, demo))
    jobs = [JobSpec("shards", "shards", one, tasks)]
    if T > 1:  # every shard exists now (afterok): the fast path of `kdscale shards` writes the index
        verify = [Task(_task_label(p, "finalize+verify"), str(p.run_dir),
                       [Step(["shards", "--cfg", str(p.cfg_path), "--task-index", "0", "--num-tasks", str(T),
                              "--no-progress"]),
                        Step(["verify", str(stage_dirs(p.cfg)["shards"])])]) for p in points]
        jobs.append(JobSpec("shards-verify", "shards", Layout(1, 1, 0, 1), verify, ["shards"]))
    return jobs


def _teacher_tasks(points: list[RunPoint]) -> list[Task]:
    tasks = []
    for point in points:
        tdir = stage_dirs(point.cfg)["teachers"]
        for i, teacher in enumerate(point.cfg.teachers.members):
            step = Step(["teachers", "--cfg", str(point.cfg_path), "--index", str(i)],
                        resume_dir=str(tdir / teacher.name / "checkpoints"),
                        done_file=str(tdir / teacher.name / "teacher.json"))
            tasks.append(Task(_task_label(point, f"teacher {teacher.name}"), str(point.run_dir), [step]))
    return tasks


def _stage_job(stage: str, points: list[RunPoint], opts: Options, notes: list[str]) -> list[JobSpec]:
    wide = Layout(opts.nodes, opts.tasks_per_node, opts.gpus_per_node, opts.cpus_per_task)
    single = Layout(1, 1, 1 if opts.gpus_per_node else 0, opts.cpus_per_task)
    if stage == "shards":
        return _shards_jobs(points, opts)
    if stage == "teachers":
        tasks = _teacher_tasks(points)
        if not tasks:
            notes.append("teachers: the config declares no teachers (teachers.members): stage skipped")
        return [JobSpec("teachers", "teachers", single, tasks)] if tasks else []
    if stage == "softlabels":
        with_teachers = [p for p in points if p.cfg.teachers.members]
        if not with_teachers:
            notes.append("softlabels: no teachers, so no soft labels: stage skipped")
            return []
        tasks = [Task(_task_label(p, "softlabels"), str(p.run_dir),
                      [Step(["softlabels", "--cfg", str(p.cfg_path), "--no-progress"]),
                       Step(["verify", str(stage_dirs(p.cfg)["softlabels"])], rank0_only=True)])
                 for p in with_teachers]
        return [JobSpec("softlabels", "softlabels", wide, tasks)]
    if stage == "train":
        with_students = [p for p in points if getattr(p.cfg, "students", None)]
        if not with_students:
            notes.append("train: the config declares no students: stage skipped")
            return []
        tasks = [Task(_task_label(p, "train"), str(p.run_dir),
                      [Step(["train", "--cfg", str(p.cfg_path), "--resume", "auto"])]) for p in with_students]
        return [JobSpec("train", "train", wide, tasks)]
    if stage == "eval":
        tasks = [Task(_task_label(p, "eval"), str(p.run_dir), [Step(["eval", "--run", str(p.run_dir)])])
                 for p in points]
        return [JobSpec("eval", "eval", single, tasks)]
    raise PlanError(f"unknown stage {stage!r}")


def build_plan(base: RunPoint, points: list[RunPoint], split: str, opts: Options,
               commands: Optional[set[str]] = None) -> Plan:
    if opts.gpus_per_node and opts.tasks_per_node != opts.gpus_per_node:
        raise PlanError(f"one task per GPU: --tasks-per-node ({opts.tasks_per_node}) must equal "
                        f"--gpus-per-node ({opts.gpus_per_node}) (or leave it out)")
    for name in ("nodes", "tasks_per_node", "cpus_per_task", "shard_tasks"):
        if getattr(opts, name) < 1:
            raise PlanError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    unknown = [s for s in opts.stages if s not in STAGES]
    if unknown:
        raise PlanError(f"--stages: unknown stage(s) {unknown}; stages: {','.join(STAGES)}")
    commands = available_commands() if commands is None else commands
    notes: list[str] = []
    jobs: list[JobSpec] = []
    for stage in [s for s in STAGES if s in opts.stages]:
        if stage not in commands:
            message = f"{stage}: this checkout's kdscale has no '{stage}' command yet"
            if opts.explicit_stages:
                raise PlanError(message)
            notes.append(message + ": stage skipped")
            continue
        stage_points = points if STAGES.index(stage) >= STAGES.index(split) else [base]
        new = _stage_job(stage, stage_points, opts, notes)
        if new and jobs:
            new[0].after = [jobs[-1].name]
        jobs += new
    if not jobs:
        raise PlanError("nothing to run: no stage is selected or available")
    return Plan(base.run_dir, base, points, split, jobs, notes)
