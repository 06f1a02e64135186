"""The ``kdscale`` command: one subcommand per pipeline stage.

Every stage takes ``--cfg FILE`` and trailing ``key=value`` overrides, writes the resolved
config into its run directory, and shows a progress bar for long work.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import time
from pathlib import Path

import yaml

from kdscale import __version__
from kdscale.config import ConfigError, dump, to_dict
from kdscale.data.ingest import DataError
from kdscale.engine.signals import EXIT_PREEMPTED, Preempted
from kdscale.runlock import RunLocked, stage_lock

log = logging.getLogger("kdscale")


def _add_cfg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--cfg", required=required, help="YAML config (may extend others via 'defaults:')")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. data.demo.n=200 run.seed=1")


def _load(args):
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.schema import load_config

    return _cap_threads(load_config(args.cfg, args.overrides))


def _cap_threads(cfg):
    """Every stage runs with its share of the allocated CPUs (kdscale.engine.threads)."""
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.engine.threads import cap_threads

    cap_threads(cfg.run.threads, cfg.loader.num_workers)
    return cfg


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def cmd_config(args) -> int:
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.schema import load_config

    print(yaml.safe_dump(to_dict(load_config(args.cfg, args.overrides)), sort_keys=False), end="")
    return 0


def cmd_demo_data(args) -> int:
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.data.sources.demo import generate

    flavors = ["mimic", "cbis"] if args.flavor == "both" else [args.flavor]
    for flavor in flavors:
        out = Path(args.out) / flavor if len(flavors) > 1 else Path(args.out)
        started = time.time()
        summary = generate(out, flavor, args.n, args.seed, args.corrupt_fraction)
        print(f"demo {flavor} data: {out} ({time.time() - started:.1f} s)")
        for key, value in summary.items():
            if not isinstance(value, (dict, list)):
                print(f"  {key}: {value}")
    return 0


def cmd_inspect(args) -> int:
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.data.summary import format_table, inspect_source

    cfg = _load(args)
    out = Path(cfg.run.out_dir) / "inspect"
    out.mkdir(parents=True, exist_ok=True)
    dump(cfg, out / "config.yaml")
    payload = inspect_source(cfg, out, progress=True)
    print(format_table(payload))
    print(f"summary: {out / 'data_summary.json'}  quarantine: {out / 'quarantine.jsonl'}")
    if payload.get("failed"):
        print(f"kdscale inspect: FAILED: {payload['failed']}", file=sys.stderr)
        return 1
    return 0 if payload["ingest"]["reconciles"] else 1


def cmd_shards(args) -> int:
    """Exit status: 0 = complete, 3 = this task is done but other tasks' shards are missing,
    1 = counts do not reconcile or the build kept too little (data.min_kept_fraction; by default
    nothing kept), 2 = config/data error."""
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.data.shards import build_shards, shards_out_dir

    cfg = _load(args)
    # one lock per task index: array tasks write disjoint shards of one folder
    with stage_lock(shards_out_dir(cfg), f"shards task {args.task_index}"):
        summary = build_shards(cfg, workers=args.workers, task_index=args.task_index, num_tasks=args.num_tasks,
                               progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "ingest"}, indent=1, default=str))
    if summary.get("failed"):
        print(f"kdscale shards: FAILED: {summary['failed']}", file=sys.stderr)
        return 1
    if not summary.get("complete"):
        return 3
    return 0 if summary.get("reconciles") else 1


def _train_each(args, cfg, select, root, train, unit_dir, what: str) -> int:
    """``kdscale teachers`` / ``kdscale train``: the selected units (``--only``/``--index``),
    the resolved config written once beside them, each trained in turn (a rank of a distributed
    job trains its share of each). Rank 0 holds each unit's folder lock while it trains: a second
    run on the same unit is refused; array tasks training other units are not affected."""
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.engine.distributed import detect_world, teardown

    chosen = select(cfg, only=args.only, index=args.index)
    rank0 = detect_world().rank == 0
    if rank0:
        dump(cfg, root(cfg) / "config.yaml")
    for unit in chosen:
        with stage_lock(unit_dir(cfg, unit), f"{what} {unit.name}", enabled=rank0):
            train(cfg, unit, resume=args.resume, force=args.force)
    teardown()
    return 0


def cmd_teachers(args) -> int:
    cfg = _load(args)   # first: a config error is reported before the stage imports (torch)
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.distill.teachers import select_teachers, teachers_dir, train_teacher

    return _train_each(args, cfg, select_teachers, teachers_dir, train_teacher,
                       lambda cfg, teacher: teachers_dir(cfg) / teacher.name, "teacher")


def cmd_softlabels(args) -> int:
    cfg = _load(args)   # first: a config error is reported before the stage imports (torch)
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.distill.teacher_pass import softlabels_dir, teacher_pass
    from kdscale.engine.distributed import detect_world, teardown

    with stage_lock(softlabels_dir(cfg), "softlabels", enabled=detect_world().rank == 0):
        teacher_pass(cfg, device=args.device, progress=not args.no_progress)
    teardown()
    return 0


def cmd_train(args) -> int:
    cfg = _load(args)   # first: a config error is reported before the stage imports (torch)
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.distill.student_training import select_students, student_dir, students_root, train_student

    return _train_each(args, cfg, select_students, students_root, train_student, student_dir, "student")


def _run_config(args):
    """The config of a run directory: --cfg, else RUN/config.yaml (pipeline), else the one
    `kdscale train` wrote (RUN/students/config.yaml)."""
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.schema import load_config

    if args.cfg:
        return _cap_threads(load_config(args.cfg, [*args.overrides, f"run.out_dir={args.run}"] if args.run
                                        else args.overrides))
    if not args.run:
        raise ValueError("give --run RUN_DIR (a run directory) or --cfg FILE")
    run = Path(args.run)
    for candidate in (run / "config.yaml", run / "students" / "config.yaml"):
        if candidate.is_file():
            return _cap_threads(load_config(candidate, [*args.overrides, f"run.out_dir={run}"]))
    raise FileNotFoundError(f"{run}: no config.yaml (nor students/config.yaml): is this a kdscale run directory?")


def cmd_eval(args) -> int:
    cfg = _run_config(args)   # first: a config error is reported before the stage imports (torch)
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.eval.run_eval import evaluate_run, report_run

    with stage_lock(cfg.run.out_dir, "eval"):
        summary = evaluate_run(cfg, split=args.split, progress=True)
        print(f"evaluation of {summary['students']} on {summary['split']}: {summary['eval_dir']}")
        if not args.no_report:
            report = report_run(cfg)
            print(report["table"])
            print(f"report: {report['html']}")
    return 0


def cmd_report(args) -> int:
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.eval.report import report_run

    report = report_run(_run_config(args))
    print(report["table"])
    print(f"report: {report['html']}  (markdown: {report['markdown']})")
    return 0


def cmd_verify(args) -> int:
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.data.shard_index import verify_shards
    from kdscale.data.softlabel_format import verify_softlabels

    root = Path(args.dir)
    is_soft = (root / "index.json").is_file()  # soft-label sets have one index at the top
    problems = verify_softlabels(root, args.data) if is_soft else verify_shards(root)
    for problem in problems:
        print(f"FAIL {problem}")
    print(f"{args.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def cmd_pipeline(args) -> int:
    cfg = _load(args)   # first: a config error is reported before the stage imports (torch)
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.pipeline import run_pipeline

    return run_pipeline(cfg, stages=args.stages)


def cmd_experiment(args) -> int:
    # per command: --help starts in 0.07 s, stages pay numpy/torch (~4 s) only when run (measured)
    from kdscale.experiments.runner import load_experiment, run_experiment

    exp = load_experiment(args.cfg, args.overrides)
    split = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    arms = split(args.only) or None
    unknown = sorted(set(arms or []) - {a.name for a in exp.arms})
    if unknown:
        raise ValueError(f"--only names unknown arm(s) {unknown}; arms: {[a.name for a in exp.arms]}")
    seeds = [int(s) for s in split(args.seeds)] or None
    if seeds and set(seeds) - set(exp.seeds):
        raise ValueError(f"--seeds {sorted(set(seeds) - set(exp.seeds))} not in the experiment's seeds {exp.seeds}")
    run_experiment(exp, arms=arms, seeds=seeds, dry_run=args.dry_run, force=args.force,
                   aggregate_only=args.aggregate_only)
    return 0


# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdscale", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"kdscale {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print the resolved config (defaults + file + overrides)")
    _add_cfg(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("demo-data", help="write small MIMIC-/CBIS-format demo trees with designed signal")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=400, help="MIMIC: ICU stays; CBIS: abnormalities (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flavor", choices=["mimic", "cbis", "both", "icu", "icu_multimodal", "icu_multiclass"],
                   default="both", help="both = mimic + cbis; icu*: ICU stays with static tabular fields")
    p.add_argument("--corrupt-fraction", type=float, default=0.0,
                   help="share of files written corrupt, to exercise the quarantine path")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("inspect", help="stream the configured source and summarise it (counts, skips)")
    _add_cfg(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("shards", help="write WebDataset shards from the configured source")
    _add_cfg(p)
    p.add_argument("--workers", type=int, default=1, help="local writer processes")
    p.add_argument("--task-index", type=int, default=0, help="this task's index (SLURM array)")
    p.add_argument("--num-tasks", type=int, default=1,
                   help="number of tasks sharing the build: task i writes shards k with k %% n == i")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("teachers", help="train the configured teachers, each on all samples of its modality")
    _add_cfg(p)
    p.add_argument("--only", default="", help="comma-separated teacher names (default: all)")
    p.add_argument("--index", type=int, default=None, help="train only teacher number INDEX (SLURM array task)")
    p.add_argument("--resume", default=None, help="'latest', 'best' or a checkpoint path: continue training")
    p.add_argument("--force", action="store_true", help="retrain teachers that are already trained")
    p.set_defaults(func=cmd_teachers)

    p = sub.add_parser("softlabels", help="run every teacher once over all shards, writing aligned soft labels "
                                          "(distributed under torchrun / SLURM)")
    _add_cfg(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_softlabels)

    p = sub.add_parser("train", help="train the configured students (MIND, MMPKD, baselines) from the shards "
                                     "and soft labels (distributed under torchrun / SLURM)")
    _add_cfg(p)
    p.add_argument("--only", default="", help="comma-separated student names (default: all)")
    p.add_argument("--index", type=int, default=None, help="train only student number INDEX (SLURM array task)")
    p.add_argument("--resume", default=None,
                   help="'latest', 'best', a checkpoint path, or 'auto' (latest when one exists, else fresh)")
    p.add_argument("--force", action="store_true", help="retrain students that are already trained")
    p.set_defaults(func=cmd_train)

    for name, func, text in (("eval", cmd_eval, "evaluate every trained student of a run: predictions, metrics with "
                                                   "bootstrap CIs, cohorts, robustness, subgroups, calibration, "
                                                   "attention localization, comparisons; then the report"),
                             ("report", cmd_report, "render the HTML + Markdown report of an evaluated run")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--run", default="", help="run directory (run.out_dir of the pipeline)")
        _add_cfg(p, required=False)
        if name == "eval":
            p.add_argument("--split", default=None, help="test (default: eval.split) or val")
            p.add_argument("--no-report", action="store_true", help="do not render the report afterwards")
        p.set_defaults(func=func)

    p = sub.add_parser("verify", help="check a shard set (or a soft-label set) against its index; "
                                      "non-zero exit on problems")
    p.add_argument("dir", help="shard folder (holding <split>/index.json) or soft-label folder (index.json)")
    p.add_argument("--data", default=None, help="soft labels: the data shard folder (default: the one recorded)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("experiment", help="run an experiment (arms x seeds of pipeline runs, teachers shared per "
                                          "seed) and aggregate it: mean ± sd over seeds, pooled paired bootstrap "
                                          "vs the reference arm (configs/experiments/)")
    _add_cfg(p)
    p.add_argument("--only", default="", help="comma-separated arm names (default: all)")
    p.add_argument("--seeds", default="", help="comma-separated subset of the experiment's seeds (default: all)")
    p.add_argument("--dry-run", action="store_true",
                   help="print every run (done / to run) with its kdscale and launch/submit.py command; run nothing")
    p.add_argument("--force", action="store_true", help="re-run finished runs (default: skip them, i.e. resume)")
    p.add_argument("--aggregate-only", action="store_true", help="only re-aggregate the evaluated runs")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("pipeline", help="run the pipeline's stages locally in order")
    _add_cfg(p)
    p.add_argument("--stages", default="", help="comma-separated subset (default: all that exist)")
    p.set_defaults(func=cmd_pipeline)
    return parser


def describe_os_error(exc: OSError) -> str:
    """``/path: No space left on device [ENOSPC]``: the path and the cause, one line."""
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    cause = (exc.strerror or str(exc)) + (f" [{code}]" if code else "")
    where = exc.filename or ""
    if exc.filename2:
        where += f" -> {exc.filename2}"
    return f"{where}: {cause}" if where else cause


def _checkpoint_error() -> type:
    """CheckpointError when its module (which imports torch) was loaded, else a class nothing
    raises: a failed checkpoint load is one line too, without importing torch for every command."""
    module = sys.modules.get("kdscale.engine.checkpoint")
    return module.CheckpointError if module is not None else _NeverRaised


class _NeverRaised(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except Preempted as exc:
        # A save was requested (SLURM preemption / time limit): the checkpoint is written; the
        # distinct status tells the launcher to requeue and resume (--resume auto).
        print(f"kdscale {args.command}: preempted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (ConfigError, DataError, ValueError, FileNotFoundError, RunLocked, _checkpoint_error()) as exc:
        # Expected user-facing failures: one clear line (the traceback with -v).
        if args.verbose:
            raise
        print(f"kdscale {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Disk full, read-only file system, permissions: one line naming the path and the cause
        # (temp files are removed by the writers; the last good checkpoint is untouched).
        if args.verbose:
            raise
        print(f"kdscale {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
