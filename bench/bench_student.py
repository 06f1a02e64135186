#!/usr/bin/env python
"""Student training throughput (issue #5): the MIND student trained through the real engine
(Trainer + shard loader + soft labels) in fp32 and in bf16 autocast, runs interleaved
(fp32, bf16, fp32, bf16, ...) so that both see the same machine noise; reports samples/s, the
fraction of step time spent waiting for data, and peak memory, and the bf16/fp32 ratio.

On a CUDA machine (``--device cuda``) the same runs give GPU samples/s, GPU peak memory and the
data-wait fraction (target < 5%).

    python bench/bench_student.py                      # demo shards at 128 px, ~3 min on 2 CPU cores
    python bench/bench_student.py --n 200 --steps 8    # quick
Saves bench/results/student.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_cfg(work: Path, args):
    from kdscale.config import validate
    from kdscale.schema import Config

    tree = {"run": {"out_dir": str(work / "run")},
            "data": {"source": "demo", "demo": {"out_dir": str(work / "demo"), "flavor": "mimic", "n": args.n,
                                               "task": "phenotyping", "cohort": "partial"}},
            "loader": {"image_size": args.image_size, "resize_size": int(args.image_size * 9 / 8),
                       "num_workers": args.workers, "batch_size": args.batch_size},
            "teachers": {"members": [{"name": "cxr", "model": {"modality": "image", "arch": "resnet10"}},
                                     {"name": "ehr", "model": {"modality": "ehr", "arch": "lstm_small"}}],
                         "ensembles": [{"name": "image", "members": ["cxr"]}, {"name": "ehr", "members": ["ehr"]}],
                         "train": {"epochs": 1, "steps_per_epoch": 1, "progress": False}},
            "students": [{"name": "mind", "method": "mind", "model": (
                {"kind": "multi", "modalities": ["image", "ehr"]} if args.student_kind == "multi" else {"kind": "mind"})}]}
    return validate(Config, tree)


def one_run(cfg, precision: str, steps: int, device: str, out: Path) -> dict:
    from kdscale.data.loader import build_loader
    from kdscale.data.shard_index import read_index
    from kdscale.data.shards import shards_out_dir
    from kdscale.data.softlabel_format import read_soft_index
    from kdscale.distill.student_training import student_loader_config, build_task
    from kdscale.distill.teacher_pass import softlabels_dir
    from kdscale.engine.config import TrainConfig
    from kdscale.engine.rng import seed_everything
    from kdscale.engine.trainer import Trainer
    from kdscale.models.students import build_student

    student = cfg.students[0]
    labels = read_index(shards_out_dir(cfg), "train")["label_names"]
    soft = softlabels_dir(cfg)
    seed_everything(0, 0)
    model = build_student(student.model, len(labels))
    task = build_task(student, read_soft_index(soft)["ensemble_names"], "multilabel")
    loader = build_loader(shards_out_dir(cfg), "train", student_loader_config(cfg, student), train=True, soft_dir=soft)
    tcfg = TrainConfig(epochs=2, steps_per_epoch=steps, precision=precision, device=device, progress=False,
                       log_every_steps=1, keep_last=1)
    started = time.perf_counter()
    Trainer(tcfg, out, model, task, loader, None, label_names=labels).fit()
    wall = time.perf_counter() - started
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch_end = [e for e in events if e.get("event") == "epoch_end"][-1]   # the second epoch: warm
    steps_logged = [e for e in events if e.get("kind") == "step"]
    loader.close()
    # the timed epoch has as many steps as the loader plans (at most --steps): recorded, not assumed
    timed_steps = sum(1 for e in steps_logged if e.get("epoch") == epoch_end["epoch"])
    return {"precision": precision, "samples_per_s": epoch_end["samples_per_s_rank0"], "steps_timed": timed_steps,
            "data_wait_fraction": epoch_end["data_wait_fraction"],
            "peak_memory_mb": max(e.get("peak_memory_mb", 0.0) for e in steps_logged), "wall_s": round(wall, 2),
            "final_loss": steps_logged[-1]["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=600, help="demo ICU stays")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="loader workers per rank")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per epoch (2 epochs, the 2nd timed)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved fp32/bf16 pairs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--student-kind", default="mind", choices=("mind", "multi"),
                        help="the paper's MIND student as kind mind, or as kind multi [image, ehr] (same 7.5M model)")
    parser.add_argument("--work", default="", help="work folder (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "student.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from kdscale.data.shards import build_shards
    from kdscale.distill.teacher_pass import teacher_pass
    from kdscale.distill.teachers import train_teacher

    work = Path(args.work or tempfile.mkdtemp(prefix="kdscale-bench-student-"))
    cfg = make_cfg(work, args)
    print(f"preparing demo shards + 2 teachers + soft labels in {work} ...")
    build_shards(cfg, workers=1)
    for teacher in cfg.teachers.members:
        train_teacher(cfg, teacher)
    teacher_pass(cfg, device=args.device, progress=False)
    runs = []
    for r in range(args.repeats):
        for precision in ("fp32", "bf16"):
            result = one_run(cfg, precision, args.steps, args.device, work / f"train-{precision}-{r}")
            runs.append(result)
            print(f"  {precision}: {result['samples_per_s']:.1f} samples/s, data wait "
                  f"{result['data_wait_fraction']:.1%}, peak {result['peak_memory_mb']:.0f} MB")
    med = {p: statistics.median(r["samples_per_s"] for r in runs if r["precision"] == p) for p in ("fp32", "bf16")}
    wait = {p: statistics.median(r["data_wait_fraction"] for r in runs if r["precision"] == p) for p in ("fp32", "bf16")}
    summary = {"bench": "student", "device": args.device, "machine": platform.platform(), "cpus": os.cpu_count(),
               "n": args.n, "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
               "steps_requested": args.steps, "steps_timed": min(r["steps_timed"] for r in runs), "runs": runs, "median_samples_per_s": med,
               "median_data_wait_fraction": wait, "bf16_over_fp32": round(med["bf16"] / med["fp32"], 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"MIND student ({args.device}): fp32 {med['fp32']:.1f} samples/s (data wait {wait['fp32']:.1%}), "
          f"bf16 {med['bf16']:.1f} samples/s (data wait {wait['bf16']:.1%}); bf16/fp32 = {summary['bf16_over_fp32']}")
    if summary["steps_timed"] < args.steps:
        print(f"note: the timed epoch had only {summary['steps_timed']} of the {args.steps} steps asked for "
              f"(the split's batches per epoch at this --n, --batch-size and --workers)")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
