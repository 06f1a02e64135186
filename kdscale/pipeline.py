"""Run the pipeline's stages locally, in order, into one run directory.

Each stage is a function (cfg, run_dir) -> dict of outputs. On a cluster, launch/submit.py runs
the same stage functions as SLURM jobs; locally they run here one after the other.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from kdscale.config import config_hash, dump
from kdscale.data.shard_index import verify_shards
from kdscale.data.shards import build_shards, shards_out_dir
from kdscale.data.softlabel_format import verify_softlabels
from kdscale.data.summary import format_table, inspect_source
from kdscale.distill.student_training import student_dir, students_root, train_student
from kdscale.distill.teacher_pass import softlabels_dir, teacher_pass
from kdscale.distill.teachers import teachers_dir, train_teacher
from kdscale.eval.run_eval import evaluate_run, report_run
from kdscale.runlock import stage_lock


def stage_data(cfg, run_dir: Path) -> dict:
    """Stream the source once: counts, presence, label prevalence, skips (data_summary.json)."""
    out = run_dir / "data"
    payload = inspect_source(cfg, out)
    print(format_table(payload))
    if payload.get("failed"):
        raise RuntimeError(f"data stage failed: {payload['failed']}")
    if not payload["ingest"]["reconciles"]:
        raise RuntimeError(f"ingest counts do not reconcile: {payload['ingest']}")
    return {"summary": str(out / "data_summary.json"), "quarantine": str(out / "quarantine.jsonl")}


def stage_shards(cfg, run_dir: Path) -> dict:
    with stage_lock(shards_out_dir(cfg), "shards task 0"):     # the lock `kdscale shards` takes
        summary = build_shards(cfg, workers=1)
    if summary.get("failed"):
        raise RuntimeError(f"shards stage failed: {summary['failed']}")
    problems = verify_shards(summary["out_dir"])
    if problems:
        raise RuntimeError("shard verification failed:\n  " + "\n  ".join(problems))
    return {"shards": summary["out_dir"], "verified": True}


def stage_teachers(cfg, run_dir: Path) -> dict:
    if not cfg.teachers.members:
        print("no teachers configured (teachers.members): stage skipped")
        return {"skipped": "no teachers configured"}
    results = {}
    for teacher in cfg.teachers.members:
        with stage_lock(teachers_dir(cfg) / teacher.name, f"teacher {teacher.name}"):   # as `kdscale teachers`
            results[teacher.name] = train_teacher(cfg, teacher)
    return {"teachers": str(teachers_dir(cfg)),
            "val_auroc_macro": {name: info.get("val_auroc_macro") for name, info in results.items()}}


def stage_softlabels(cfg, run_dir: Path) -> dict:
    if not cfg.teachers.members:
        return {"skipped": "no teachers configured"}
    with stage_lock(softlabels_dir(cfg), "softlabels"):
        summary = teacher_pass(cfg)
    problems = verify_softlabels(summary["out_dir"])
    if problems:
        raise RuntimeError("soft-label verification failed:\n  " + "\n  ".join(problems))
    return {"softlabels": summary["out_dir"], "samples": summary["num_samples"], "verified": True}


def stage_train(cfg, run_dir: Path) -> dict:
    if not cfg.students:
        print("no students configured (students): stage skipped")
        return {"skipped": "no students configured"}
    results = {}
    for student in cfg.students:
        with stage_lock(student_dir(cfg, student), f"student {student.name}"):   # as `kdscale train`
            results[student.name] = train_student(cfg, student)
    return {"students": str(students_root(cfg)),
            "val_auroc_macro": {name: info.get("val_auroc_macro") for name, info in results.items()}}


def stage_eval(cfg, run_dir: Path) -> dict:
    if not cfg.students:
        return {"skipped": "no students configured"}
    with stage_lock(cfg.run.out_dir, "eval"):
        summary = evaluate_run(cfg)
        report = report_run(cfg)
    return {"eval": summary["eval_dir"], "report": report["html"], "results": report["table"]}


STAGES: dict[str, Callable] = {"data": stage_data, "shards": stage_shards, "teachers": stage_teachers,
                               "softlabels": stage_softlabels, "train": stage_train, "eval": stage_eval}


def run_pipeline(cfg, stages: str = "") -> int:
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump(cfg, run_dir / "config.yaml")
    wanted = [s.strip() for s in stages.split(",") if s.strip()] or list(STAGES)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; available: {list(STAGES)}")
    outputs = {"config": str(run_dir / "config.yaml"), "config_hash": config_hash(cfg)}
    for name in wanted:
        started = time.time()
        print(f"== stage {name}")
        outputs[name] = STAGES[name](cfg, run_dir)
        outputs[name]["seconds"] = round(time.time() - started, 2)
        print(f"== stage {name} done in {outputs[name]['seconds']} s")
    (run_dir / "pipeline.json").write_text(json.dumps(outputs, indent=2))
    print(f"\nkdscale pipeline finished. Outputs in {run_dir.resolve()}:")
    for name in wanted:
        for key, value in outputs[name].items():
            if key not in ("seconds", "results"):
                print(f"  {name}.{key}: {value}")
    if "results" in outputs.get("eval", {}):
        print(f"\nResults ({cfg.eval.split} split):\n{outputs['eval']['results']}")
        print(f"\nReport: {outputs['eval']['report']}")
    return 0
