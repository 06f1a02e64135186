#!/usr/bin/env python
"""Teacher-pass benchmark (issue #4), three figures side by side in one run:

1. pass efficiency: samples/s of the teacher pass (read + decode + forward + write, one rank)
   divided by samples/s of the raw batched forward of the same teachers on in-memory batches.
   Target >= 0.85: I/O and writing hidden behind compute.
2. storage: soft-label bytes per sample vs data-shard bytes per sample; target
   <= 2 bytes x outputs x (teachers + ensembles) + 64 bytes.
3. student step: a ResNet-10 image student trained (a) supervised only, (b) with OFFLINE soft
   labels joined by the loader (KD loss on the stored ensemble), (c) with the ResNet-34/18/10
   teacher ensemble run ONLINE in the loop. Time per step including data; reports the
   speedup (c)/(b) and the overhead (b)/(a) (target <= 1.10).

Teachers are randomly initialised (throughput does not depend on the weights): their
teacher.pt/teacher.json are written directly, as `kdscale teachers` would.

    python bench/bench_teacher_pass.py                 # ~3-4 min on 2 CPU cores
    python bench/bench_teacher_pass.py --n 120 --image-size 96 --steps 6   # quick
    python bench/bench_teacher_pass.py --pass-workers 1   # decoding workers beside the forward
Saves bench/results/teacher_pass.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMAGE_TEACHERS = [("cxr_resnet34", "resnet34"), ("cxr_resnet18", "resnet18"), ("cxr_resnet10", "resnet10")]


def make_cfg(work: Path, args):
    from kdscale.config import validate
    from kdscale.schema import Config

    tree = {"run": {"out_dir": str(work / "run")},
            "data": {"source": "demo", "demo": {"out_dir": str(work / "demo"), "flavor": "mimic", "n": args.n,
                                               "task": "phenotyping", "cohort": "partial"}},
            "shards": {"max_samples_per_shard": args.shard_size},
            "loader": {"image_size": args.image_size, "resize_size": int(args.image_size * 8 / 7),
                       "num_workers": args.workers, "batch_size": args.batch_size, "modalities": ["image", "ehr"]},
            "teachers": {"members": [{"name": n, "model": {"modality": "image", "arch": a}} for n, a in IMAGE_TEACHERS]
                         + [{"name": "ehr_lstm", "model": {"modality": "ehr", "arch": "lstm"}}]},
            "softlabels": {"batch_size": args.pass_batch, "num_workers": args.pass_workers}}
    return validate(Config, tree)


def materialize_teachers(cfg, label_names, n_features):
    """Random-weight teachers saved as `kdscale teachers` saves trained ones."""
    import torch

    from kdscale.data.tario import sha256_file
    from kdscale.distill.teachers import teachers_dir
    from kdscale.engine.checkpoint import save_atomic
    from kdscale.models.registry import build_model

    for i, teacher in enumerate(cfg.teachers.members):
        torch.manual_seed(i)
        model = build_model(teacher.model, len(label_names), ehr_features=n_features)
        out = teachers_dir(cfg) / teacher.name
        out.mkdir(parents=True, exist_ok=True)
        save_atomic({"model": model.state_dict(), "model_config": dataclasses.asdict(teacher.model),
                     "label_names": label_names, "name": teacher.name}, out / "teacher.pt")
        info = {"name": teacher.name, "modality": teacher.model.modality, "arch": teacher.model.arch,
                "label_names": label_names, "checkpoint": str((out / "teacher.pt").resolve()),
                "checkpoint_sha256": sha256_file(out / "teacher.pt"), "val_auroc_macro": 0.5}
        (out / "teacher.json").write_text(json.dumps(info))


def raw_forward_rate(cfg, teachers, device: str = "cpu") -> float:
    """Samples/s of run_teachers on the SAME samples as the pass (every split, same batch size),
    decoded beforehand into memory: the compute limit the pass is compared against."""
    import torch

    from kdscale.data.loader import build_loader
    from kdscale.data.shards import shards_out_dir
    from kdscale.distill.teacher_pass import run_teachers

    lcfg = dataclasses.replace(cfg.loader, batch_size=cfg.softlabels.batch_size, num_workers=0, drop_last=False)
    mem = []
    for split in ("train", "val", "test"):
        mem += list(build_loader(shards_out_dir(cfg), split, lcfg, train=False, rank=0, world_size=1))
    dev = torch.device(device)
    for model in teachers.models:
        model.to(dev)
    run_teachers(teachers, mem[0], dev)  # warm-up
    _sync(dev)
    tick, n = time.perf_counter(), 0
    for batch in mem:
        run_teachers(teachers, batch, dev)
        n += int(batch["valid"].sum())
    _sync(dev)
    return n / (time.perf_counter() - tick)


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def storage_at_shard_size(soft_index: dict, n: int = 1000) -> float:
    """Bytes per sample of one soft-label shard of ``n`` samples with this run's K, G, C and key
    length (the tar format pads each shard to 10 KiB records: small shards amortise it badly)."""
    import numpy as np

    from kdscale.data.softlabel_format import FORMAT, SoftShard, write_soft_shard

    k, g, c = len(soft_index["teacher_names"]), len(soft_index["ensemble_names"]), len(soft_index["label_names"])
    keys = [f"p{10000000 + i}_s{50000000 + i}" for i in range(n)]
    shard = SoftShard({"format": FORMAT, "data_shard": "shard-000000.tar", "data_sha256": "0" * 64, "count": n,
                       "teachers": "0" * 16, "split": "train"}, keys,
                      np.zeros((n, k, c), np.float16), np.ones((n, k), bool), np.zeros((n, g, c), np.float16),
                      np.ones((n, g), bool))
    with tempfile.TemporaryDirectory() as tmp:
        return write_soft_shard(Path(tmp) / "s.tar", shard)["bytes"] / n


def student_steps(cfg, soft_dir, mode: str, steps: int, teachers=None) -> float:
    """Seconds per training step (data included) of a ResNet-10 image student."""
    import torch

    from kdscale.data.loader import build_loader
    from kdscale.data.shards import shards_out_dir
    from kdscale.distill.losses import kd_loss, supervised_loss
    from kdscale.models.config import ModelConfig
    from kdscale.models.registry import build_model

    torch.manual_seed(0)
    lcfg = dataclasses.replace(cfg.loader, modalities=["image"], require=["image"])
    loader = build_loader(shards_out_dir(cfg), "train", lcfg, train=True, rank=0, world_size=1,
                          soft_dir=soft_dir if mode == "offline" else None)
    n_labels = len(loader.index["label_names"])
    student = build_model(ModelConfig(modality="image", arch="resnet10"), n_labels)
    opt = torch.optim.Adam(student.parameters(), 1e-4)
    image_teachers = [m for m, i in zip(teachers.models, teachers.infos) if i["modality"] == "image"] if teachers else []
    image_group = teachers.ensembles and [e["name"] for e in teachers.ensembles].index("image") if teachers else 0
    times, it = [], iter(loader)
    for step in range(steps + 1):
        tick = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            loader.set_epoch(loader.epoch + 1)
            it = iter(loader)
            batch = next(it)
        logits = student(batch)
        loss = supervised_loss(logits, batch["labels"], "multilabel")
        if mode == "offline":
            q = torch.sigmoid(batch["soft"]["ensemble"][:, image_group].float() / 2.0)
            loss = loss + kd_loss(logits, q, 2.0, "multilabel", mask=batch["soft"]["ensemble_seen"][:, image_group])
        elif mode == "online":
            with torch.inference_mode():
                probs = torch.stack([torch.sigmoid(t(batch).float() / 2.0) for t in image_teachers]).mean(0)
            loss = loss + kd_loss(logits, probs.clone(), 2.0, "multilabel")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step:  # the first step pays worker start-up
            times.append(time.perf_counter() - tick)
    return sum(times) / len(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=600, help="demo ICU stays")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16, help="student batch")
    parser.add_argument("--pass-batch", type=int, default=64, help="teacher-pass batch")
    parser.add_argument("--workers", type=int, default=0, help="student loader workers")
    parser.add_argument("--pass-workers", type=int, default=-1, help="teacher-pass workers (-1 = auto)")
    parser.add_argument("--steps", type=int, default=10, help="student steps per mode")
    parser.add_argument("--device", default="cpu", help="the pass and the raw forward: cpu or cuda")
    parser.add_argument("--skip-student", action="store_true", help="only the pass and storage figures (the "
                        "student-step comparison runs on CPU)")
    parser.add_argument("--work", default="", help="work folder (default: a temp folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "teacher_pass.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from kdscale.data.shard_index import read_index
    from kdscale.data.shards import build_shards, shards_out_dir
    from kdscale.data.softlabel_format import read_soft_index
    from kdscale.distill.teacher_pass import load_teachers, softlabels_dir, teacher_pass

    work = Path(args.work or tempfile.mkdtemp(prefix="kdscale-bench-pass-"))
    cfg = make_cfg(work, args)
    build_shards(cfg, workers=1)
    index = read_index(shards_out_dir(cfg), "train")
    materialize_teachers(cfg, index["label_names"], int(index["ehr"]["num_features"]))
    teachers = load_teachers(cfg)

    summary = teacher_pass(cfg, device=args.device, progress=True)
    soft_index = read_soft_index(softlabels_dir(cfg))
    pass_rate = summary["num_samples"] / soft_index["pass"]["wall_s"]
    raw_rate = raw_forward_rate(cfg, teachers, args.device)

    data_bytes = sum(e["bytes"] for s in ("train", "val", "test") for e in read_index(shards_out_dir(cfg), s)["shards"])
    soft_bytes = sum(e["bytes"] for s in soft_index["splits"].values() for e in s["shards"])
    n_samples = summary["num_samples"]
    k, g, c = len(soft_index["teacher_names"]), len(soft_index["ensemble_names"]), len(soft_index["label_names"])
    budget = 2 * c * (k + g) + 64

    if args.device != "cpu":   # the student-step comparison moves CPU batches: keep its teachers there
        for model in teachers.models:
            model.to("cpu")
    step = {} if args.skip_student else {mode: student_steps(cfg, softlabels_dir(cfg), mode, args.steps, teachers)
                                         for mode in ("supervised", "offline", "online")}
    result = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(), "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None},
        "args": vars(args),
        "pass": {"samples": n_samples, "pass_samples_per_s": round(pass_rate, 2),
                 "raw_forward_samples_per_s": round(raw_rate, 2), "efficiency": round(pass_rate / raw_rate, 3),
                 "target_efficiency": 0.85, "forward_s": soft_index["pass"]["forward_s"],
                 "wall_s": soft_index["pass"]["wall_s"]},
        "storage": {"soft_bytes_per_sample": round(soft_bytes / n_samples, 1),
                    "data_bytes_per_sample": round(data_bytes / n_samples, 1),
                    "soft_bytes_per_sample_at_1000_per_shard": round(storage_at_shard_size(soft_index), 1),
                    "teachers": k, "ensembles": g, "outputs": c, "budget_bytes_per_sample": budget,
                    "within_budget_at_1000_per_shard": storage_at_shard_size(soft_index) <= budget},
        "student_step_s": {m: round(v, 4) for m, v in step.items()},
    }
    if step:
        result["offline_overhead_vs_supervised"] = round(step["offline"] / step["supervised"], 3)
        result["online_vs_offline_speedup"] = round(step["online"] / step["offline"], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "args")}, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
