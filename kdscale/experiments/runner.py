"""`kdscale experiment --cfg configs/experiments/mind.yaml`: a paper's ablation table as one command.

An experiment config names a base pipeline config, a list of **arms** (each one student, plus
optional overrides of the student's training stage) and **seeds**. Every (arm, seed) is a real
pipeline run (``kdscale pipeline --cfg BASE k=v ... --stages train,eval``) in its own run
directory; what does not depend on the arm is built once and shared honestly:

    <out_dir>/shared/                 data summary + shards (the data do not depend on the seed)
    <out_dir>/seed-<s>/               teachers + soft labels, trained with run.seed = s
    <out_dir>/seed-<s>/<arm>/         the arm's student (run.seed = s) and its evaluation
    <out_dir>/results/<name>/aggregate.json     per arm mean ± sd over seeds, per-seed values,
                                                pooled paired bootstrap of each arm vs the reference
    <out_dir>/results/<name>/report.{md,html}   the same as tables (+ d_util vs fusion AUROC figure)

Two experiments may share an out_dir: a run whose resolved config is the same (same base,
overrides, seed and arm student) is then done once and used by both.

Each unit writes ``experiment-done.json`` (the hash of its resolved config) when it finishes;
a re-run skips finished units (resume) and redoes a unit whose config changed. An arm may only
change the students and evaluation: an arm that would change the data, shards, loader, teachers
or soft labels of its seed is an error naming the arm, because then sharing them would be wrong.

Every run is expressible as ``BASE + overrides``; ``--dry-run`` prints those commands, for
``kdscale pipeline`` locally and for ``launch/submit.py`` on SLURM (one submission per unit; the
arm runs of a seed must start after that seed's teacher run finished).
"""
from __future__ import annotations

import copy
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from kdscale import config
from kdscale.config import ConfigError, apply_overrides, config_hash, load_tree, to_dict
from kdscale.io.atomic import write_json_atomic
from kdscale.experiments.aggregate import aggregate, render
from kdscale.experiments.runner_config import ArmConfig, ExperimentConfig, SweepConfig  # noqa: F401  (re-exported)
from kdscale.progress import progress_bar
from kdscale.schema import Config


DONE = "experiment-done.json"
SHARED_STAGES = "data,shards"
SEED_STAGES = "teachers,softlabels"
ARM_STAGES = "train,eval"
# sections an arm may change; everything else must equal its seed run's (it is shared)
ARM_SECTIONS = ("run", "students", "eval")


def load_experiment(path, overrides=()) -> ExperimentConfig:
    """An experiment config (with ``defaults:`` and key=value overrides, like every config);
    relative paths (base, out_dir) resolve against the working directory."""
    return config.load(ExperimentConfig, path, overrides)


# ---------------------------------------------------------------------------------------------
# Units: the runs an experiment consists of
# ---------------------------------------------------------------------------------------------

@dataclass
class Unit:
    kind: str                   # "shared", "seed" or "arm"
    run_dir: Path
    overrides: list[str]        # on top of the base config
    stages: str
    seed: Optional[int] = None
    arm: Optional[str] = None

    @property
    def label(self) -> str:
        if self.kind == "shared":
            return "shared data + shards"
        if self.kind == "seed":
            return f"seed {self.seed}: teachers + soft labels"
        return f"seed {self.seed}: arm {self.arm}"


def _flow(value: Any) -> str:
    """A YAML flow value on one line (for a key=value override)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()


def _base_tree(exp: ExperimentConfig) -> dict:
    tree = json.loads(json.dumps(load_tree(exp.base, {})))   # no YAML anchor shared between students
    return apply_overrides(tree, exp.overrides, {})


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def arm_student(arm: ArmConfig, tree: dict) -> dict:
    """The arm's student entry: ``student``, merged over the base config's ``from_base`` student."""
    student = arm.student
    if arm.from_base:
        base_students = {s.get("name"): s for s in tree.get("students") or [] if isinstance(s, dict)}
        if arm.from_base not in base_students:
            raise ConfigError(f"arm {arm.name!r}: from_base {arm.from_base!r} is not a student of the base config "
                              f"(its students: {sorted(n for n in base_students if n)})")
        student = _deep_merge(base_students[arm.from_base], student)
    if not student:
        raise ConfigError(f"arm {arm.name!r}: give student (a students: entry) and/or from_base")
    return {**student, "name": arm.name}


def plan_units(exp: ExperimentConfig, arms: Optional[list[str]] = None,
               seeds: Optional[list[int]] = None) -> list[Unit]:
    """Every unit of the experiment in execution order (shared, then per seed: teachers, arms)."""
    out = Path(exp.out_dir).resolve()
    tree = _base_tree(exp)
    shared = out / "shared"
    location = [f"shards.out_dir={shared / 'shards'}"]
    data = tree.get("data") or {}
    if data.get("source", "demo") == "demo":
        location.append(f"data.demo.out_dir={shared / 'demo-data'}")
    common = [*exp.overrides, *location]
    units = [Unit("shared", shared, [*common, f"run.out_dir={shared}", "students=[]"], SHARED_STAGES)]
    chosen_arms = [a for a in exp.arms if arms is None or a.name in arms]
    for seed in (exp.seeds if seeds is None else seeds):
        seed_dir = out / f"seed-{seed}"
        per_seed = [*common, f"run.seed={seed}", f"teachers.out_dir={seed_dir / 'teachers'}",
                    f"softlabels.out_dir={seed_dir / 'softlabels'}"]
        units.append(Unit("seed", seed_dir, [*per_seed, f"run.out_dir={seed_dir}", "students=[]"], SEED_STAGES,
                          seed=seed))
        for arm in chosen_arms:
            student = arm_student(arm, tree)
            units.append(Unit("arm", seed_dir / arm.name,
                              [*per_seed, f"run.out_dir={seed_dir / arm.name}", f"students=[{_flow(student)}]",
                               *arm.overrides],
                              ARM_STAGES, seed=seed, arm=arm.name))
    return units


def unit_config(exp: ExperimentConfig, unit: Unit):
    """The validated pipeline config of a unit: the base config + the unit's overrides. The tree
    is copied through JSON first, so a YAML anchor shared by two students cannot leak an override."""
    origins: dict = {}
    tree = json.loads(json.dumps(config.load_tree(exp.base, origins)))
    config.apply_overrides(tree, unit.overrides, origins)
    return config.validate(Config, tree, origins)


def check_sharing(exp: ExperimentConfig, units: list[Unit]) -> dict:
    """{unit run_dir: Config}; raises when an arm would change what its seed run shares."""
    configs = {u.run_dir: unit_config(exp, u) for u in units}
    seed_cfg = {u.seed: configs[u.run_dir] for u in units if u.kind == "seed"}
    for u in units:
        if u.kind != "arm":
            continue
        a, b = to_dict(configs[u.run_dir]), to_dict(seed_cfg[u.seed])
        changed = sorted(k for k in a if k not in ARM_SECTIONS and a[k] != b[k])
        if changed:
            raise ConfigError(f"arm {u.arm!r} changes {changed}, which its seed's teachers/soft labels/shards "
                              f"share with the other arms; put such a change in the experiment's overrides")
    return configs


def _done_hash(cfg) -> str:
    return config_hash(cfg)


def is_done(unit: Unit, cfg) -> bool:
    path = unit.run_dir / DONE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("config_hash") == _done_hash(cfg)
    except (json.JSONDecodeError, OSError):
        return False


def commands(exp_base: str, unit: Unit) -> dict:
    args = " ".join(shlex.quote(o) for o in unit.overrides)
    return {"local": f"python -m kdscale.cli pipeline --cfg {shlex.quote(exp_base)} --stages {unit.stages} {args}",
            "slurm": f"python launch/submit.py --cfg {shlex.quote(exp_base)} --stages {unit.stages} {args}"}


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def run_unit(exp: ExperimentConfig, unit: Unit, cfg) -> dict:
    # torch and every stage (~3.7 s import, measured): only when units run, not for --dry-run / --aggregate-only
    from kdscale.pipeline import run_pipeline

    started = time.time()
    run_pipeline(cfg, stages=unit.stages)
    if unit.kind == "arm" and exp.shortcut:
        student = cfg.students[0]
        if student.image_only:
            # imports torch and the stages (~3.7 s): only for image arms with shortcut evaluation
            from kdscale.eval.shortcut import evaluate_shortcut

            evaluate_shortcut(cfg, student)
    record = {"config_hash": _done_hash(cfg), "kind": unit.kind, "seed": unit.seed, "arm": unit.arm,
              "seconds": round(time.time() - started, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(unit.run_dir / DONE, record)
    return record


def run_experiment(exp: ExperimentConfig, arms: Optional[list[str]] = None, seeds: Optional[list[int]] = None,
                   dry_run: bool = False, progress: bool = True, force: bool = False, aggregate_only: bool = False,
                   stream=None) -> dict:
    stream = stream or sys.stdout      # looked up per call (not bound at import)
    units = plan_units(exp, arms, seeds)
    configs = check_sharing(exp, units)
    out = Path(exp.out_dir).resolve()
    if dry_run:
        for u in units:
            state = "done" if is_done(u, configs[u.run_dir]) else "to run"
            cmd = commands(exp.base, u)
            print(f"[{state}] {u.label}: {u.run_dir}\n    local: {cmd['local']}\n    slurm: {cmd['slurm']}", file=stream)
        return {"units": len(units), "dry_run": True}
    timings = {}
    if not aggregate_only:
        out.mkdir(parents=True, exist_ok=True)
        with progress_bar(f"experiment {exp.name}", unit="run", total=len(units), requested=progress) as bar:
            for u in units:
                bar.set_postfix_str(u.label)
                cfg = configs[u.run_dir]
                if not force and is_done(u, cfg):
                    print(f"experiment {exp.name}: {u.label} already done, skipped", file=stream)
                else:
                    print(f"experiment {exp.name}: {u.label} -> {u.run_dir}", file=stream)
                    timings[str(u.run_dir)] = run_unit(exp, u, cfg)["seconds"]
                bar.update(1)

    result = aggregate(exp, units, configs)
    paths = render(exp, result, out)
    print(f"experiment {exp.name}: {paths['json']}  report: {paths['html']}", file=stream)
    print(paths["table"], file=stream)
    return {"units": len(units), "aggregate": str(paths["json"]), "report": str(paths["html"]), "timings": timings}
