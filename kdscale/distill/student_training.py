"""Students: training one student from the shards and the soft labels.

A run declares its students in ``students:`` (a list; each one a name, a ``method`` and a
``model``). ``kdscale train --cfg FILE`` trains all of them, ``--only NAME`` / ``--index I`` one
(a SLURM array task or a sweep point). Each writes ``<run.out_dir>/students/<name>/``:

* ``checkpoints/``: the engine's (atomic, keep-last-K + best, resumable with ``--resume``);
* ``student.pt``: the best weights + the student config + label names + method (what
  ``kdscale eval`` loads, with ``weights_only=True``);
* ``student.json``: method, parameter count, best validation metrics, per-epoch history, seed,
  the fingerprint of what it was trained from (a re-run with the same inputs is skipped);
* ``metrics.jsonl`` + TensorBoard events.

========== ============================ ============================================ =============
method     model.kind                   loss (kdscale/distill/tasks.py)               soft labels
========== ============================ ============================================ =============
mind       mind                         MIND: fusion + aux heads + ω-weighted KD      image, ehr ensembles
joint      joint (or mind/medfuse)      supervised fusion head only                   --
medfuse    medfuse                      supervised LSTM fusion (partial samples)      --
mmpkd      vit (or unimodal image)      (1-λ)·L(y, ŷ) + λ·L(s, ŷ), s privileged       ``teacher_ensemble``
supervised vit / unimodal               supervised loss of the one head               --
distill    multi                        one objective for any student: each head      the heads'
                                        names its teacher ensemble (``distill``)      ``teacher``
========== ============================ ============================================ =============

A student of ``model.kind: multi`` (any set of modalities) is always trained by ``DistillTask``;
``method: mind`` (variant V1), ``mmpkd`` and ``supervised`` on it are presets that
:func:`distill_config` maps onto the general form (docs/losses.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from kdscale.config import to_dict, validate
from kdscale.data.ehr import MEDFUSE_EHR_FEATURES
from kdscale.data.ingest import DataError
from kdscale.data.loader import build_loader
from kdscale.data.shard_index import read_index
from kdscale.data.shards import shards_out_dir
from kdscale.data.softlabel_format import read_soft_index
from kdscale.data.tario import sha256_file
from kdscale.distill import tasks
from kdscale.distill.kd_labels import describe as describe_kd_labels, select_kd_labels
from kdscale.distill.online_kd import OnlineSoftLabels, load_online_teachers
from kdscale.distill.student_training_config import (METHODS, StudentRunConfig,  # noqa: F401  (re-exported)
                                                     check_students)
from kdscale.distill.tasks import (SIGNAL_PREFIX, check_signal_select, mind_metrics, multi_metrics_for,
                                   signal_label_metrics, with_signal_metrics)  # noqa: F401  (re-exported)
from kdscale.distill.teacher_pass import softlabels_dir
from kdscale.distill.teachers import already_trained, fit_preprocessing, select_named
from kdscale.engine.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, save_atomic
from kdscale.engine.distributed import barrier, detect_world
from kdscale.engine.rng import seed_everything
from kdscale.engine.trainer import Trainer, default_metrics
from kdscale.io.atomic import write_json_atomic
from kdscale.models.registry import count_parameters
from kdscale.models.students import build_student, unwrap_model
from kdscale.models.students_config import StudentConfig

log = logging.getLogger(__name__)


def online_ensembles(student: StudentRunConfig) -> set:
    """The teacher ensembles a student distils from (what online KD must run)."""
    if student.method == "mmpkd":
        return {student.teacher_ensemble}
    return {student.ensemble_for.get(m, m) for m in student.mind.modalities if student.mind.weights_for(m)[1] > 0}


def students_root(cfg) -> Path:
    return Path(cfg.run.out_dir) / "students"


def student_dir(cfg, student: StudentRunConfig) -> Path:
    return Path(student.out_dir or students_root(cfg) / student.name)


def select_students(cfg, only: str = "", index: Optional[int] = None) -> list[StudentRunConfig]:
    if not cfg.students:
        raise ValueError("students is empty: the config declares no student to train (see configs/mind.yaml)")
    return select_named(cfg.students, "student", only, index)


# ---------------------------------------------------------------------------------------------
# Tasks (the engine's Task protocol) for each method
# ---------------------------------------------------------------------------------------------

def build_task(student: StudentRunConfig, ensemble_names: list[str], task: str, label_names: Sequence[str] = ()):
    main = student.main_head or None
    if student.model.kind == "multi":
        loss_cfg = student.distill_config()
        if student.method == "supervised" and loss_cfg.task != task:
            loss_cfg = dataclasses.replace(loss_cfg, task=task)
        return tasks.DistillTask(loss_cfg, ensemble_names, student.learnable_omega, main_head=main or "routed",
                                 label_names=label_names)
    if student.method == "mind":
        kwargs = {"ensemble_for": student.ensemble_for, "label_names": label_names}
        if main:
            kwargs["main_head"] = main
        return tasks.MindTask(student.mind, ensemble_names, student.learnable_omega, **kwargs)
    if student.method in ("joint", "medfuse"):
        cls = tasks.MedFuseTask if student.method == "medfuse" else tasks.JointTask
        return cls(task, student.fusion_samples or None, **({"main_head": main} if main else {}))
    head = student.head
    if student.method == "mmpkd":
        return tasks.MmpkdTask(student.mmpkd, student.teacher_ensemble if student.mmpkd.lam > 0 else "",
                               ensemble_names, head=head, main_head=main)
    return tasks.SupervisedImageTask(task, head=head)


def metric_fn_for(student: StudentRunConfig, signal_labels=()):
    """The validation metrics of ``student``; with ``signal_labels`` also ``signal/auroc_macro`` and
    ``signal/auprc_macro``: the main head's macros over those labels only (on the demo, the labels
    with designed signal; a macro over all labels is dominated by labels that carry none)."""
    if student.model.kind == "multi":
        mods = student.model.modalities
        base = multi_metrics_for(mods) if len(mods) > 1 and student.model.aux_heads else default_metrics
    else:
        base = mind_metrics if student.model.kind == "mind" and student.model.aux_heads else default_metrics
    return with_signal_metrics(base, signal_labels)


def check_select_metric(cfg, student: StudentRunConfig, label_names: list) -> None:
    """A ``signal/`` select_metric needs eval.signal_labels, all of them labels of the task."""
    check_signal_select(student.train.select_metric, cfg.eval.signal_labels, label_names,
                        f"students {student.name!r}: train.select_metric")


# ---------------------------------------------------------------------------------------------
# Soft labels: checked before training starts (the loader checks every key while reading)
# ---------------------------------------------------------------------------------------------

def check_soft_labels(soft_dir: Path, data_index: dict, split: str, label_names: list[str]) -> dict:
    """The soft-label set in ``soft_dir`` covers ``split`` of the current data shards: every shard
    present, computed from the same data shard bytes, same labels. Errors name the shard."""
    index = read_soft_index(soft_dir)
    if list(index.get("label_names") or []) != list(label_names):
        raise DataError(f"soft labels have labels {index.get('label_names')}, the data shards {label_names}",
                        file=soft_dir / "index.json")
    soft = {e["name"]: e for e in (index["splits"].get(split) or {}).get("shards", [])}
    for entry in data_index["shards"]:
        path = soft_dir / split / entry["name"]
        if entry["name"] not in soft or not path.is_file():
            raise DataError(f"soft-label shard missing for data shard {split}/{entry['name']} "
                            f"(re-run `kdscale softlabels`)", file=path)
        if soft[entry["name"]]["data_sha256"] != entry["sha256"]:
            raise DataError(f"soft-label shard is stale: data shard {split}/{entry['name']} changed since the "
                            f"teacher pass (re-run `kdscale softlabels`)", file=path)
    return index


# ---------------------------------------------------------------------------------------------
# Training one student
# ---------------------------------------------------------------------------------------------

def student_fingerprint(cfg, student: StudentRunConfig, data_index: dict, soft_index: Optional[dict]) -> str:
    payload = {"student": to_dict(student), "loader": to_dict(cfg.loader), "seed": cfg.run.seed,
               "shards": [s["sha256"] for s in data_index["shards"]],
               "soft": soft_index.get("fingerprint") if soft_index else None}
    if student.train.select_metric.startswith(SIGNAL_PREFIX):   # the labels it selects on
        payload["signal_labels"] = list(cfg.eval.signal_labels)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def student_loader_config(cfg, student: StudentRunConfig, *, training: bool = True):
    """The student's loader settings; ``samples: paired`` restricts training and model selection,
    never evaluation (``training=False``: every test sample, for the §1.4 cohorts)."""
    modalities = student.loader_modalities()
    require = [student.head] if student.model.kind in ("vit", "unimodal") or (
        student.model.kind == "multi" and len(modalities) == 1) else \
        ["image", "ehr"] if student.samples == "paired" and training else []
    return dataclasses.replace(cfg.loader, modalities=modalities, require=require,
                               batch_size=student.batch_size or cfg.loader.batch_size)


def resolve_resume(out: Path, resume: Optional[str]) -> Optional[str]:
    """``auto``: the latest checkpoint when there is one, else a fresh start (requeued jobs)."""
    if resume != "auto":
        return resume

    try:
        return "latest" if CheckpointManager(out / "checkpoints").latest() else None
    except Exception as exc:  # noqa: BLE001  (no usable checkpoint: start fresh, said loudly)
        log.warning("--resume auto: no usable checkpoint in %s (%s): starting fresh", out / "checkpoints", exc)
        return None


def train_student(cfg, student: StudentRunConfig, *, resume: Optional[str] = None, force: bool = False) -> dict:
    world = detect_world()
    shard_dir = shards_out_dir(cfg)
    index = read_index(shard_dir, "train")
    label_names = index["label_names"]
    n_features = int((index.get("ehr") or {}).get("num_features") or MEDFUSE_EHR_FEATURES)
    soft_dir, soft_index, ensemble_names, online = None, None, [], None
    if student.needs_soft_labels and student.online_kd:
        ensemble_names = [e.name for e in cfg.teachers.resolved_ensembles() if e.name in online_ensembles(student)]
        online = load_online_teachers(cfg, ensemble_names)
        soft_index = {"fingerprint": "online:" + online.fingerprint}
    elif student.needs_soft_labels:
        soft_dir = softlabels_dir(cfg)
        soft_index = check_soft_labels(soft_dir, index, "train", label_names)
        ensemble_names = list(soft_index["ensemble_names"])
    check_select_metric(cfg, student, label_names)
    out = student_dir(cfg, student)
    fingerprint = student_fingerprint(cfg, student, index, soft_index)
    done = out / "student.json"
    explicit_resume = resume not in (None, "auto")   # auto: a finished student is still skipped
    info = None if force or explicit_resume else already_trained(done, out / "student.pt", fingerprint,
                                                                 f"student {student.name}", world.rank)
    if info is not None:
        return info
    resume = resolve_resume(out, resume)
    student, kd_label_record = select_kd_labels(student, soft_dir, shard_dir) if soft_dir else (student, {})
    seed_everything(cfg.run.seed, world.rank)
    model = build_student(student.model, len(label_names), ehr_features=n_features)
    task = build_task(student, ensemble_names, cfg.teachers.task, label_names)
    loader_cfg = student_loader_config(cfg, student)
    if getattr(model, "needs_fit", False):   # report tokenizer / tabular encoding, from train only
        fit_preprocessing(model, shard_dir, loader_cfg)
    if hasattr(task, "attach"):
        task.attach(model)   # learnable ω becomes part of the model before the optimizer exists
    train_loader = build_loader(shard_dir, "train", loader_cfg, train=True, soft_dir=soft_dir)
    if online is not None:
        train_loader = OnlineSoftLabels(train_loader, online, cfg.teachers.task)
    val_loader = build_loader(shard_dir, "val", dataclasses.replace(loader_cfg, drop_last=False), train=False)
    n_params = count_parameters(unwrap_model(model))
    breakdown = getattr(model, "parameter_breakdown", None)
    breakdown = breakdown() if callable(breakdown) else None
    if world.rank == 0:
        print(f"student {student.name}: method {student.method}, {student.model.kind} student, {n_params:,} "
              f"parameters, {train_loader.plan.num_samples} train / {val_loader.plan.num_samples} val samples, "
              f"{world.world_size} process(es)" + (f", soft labels {soft_dir}" if soft_dir else "")
              + (f", online KD from {[i['name'] for i in online.infos]}" if online is not None else ""))
        if breakdown:
            print(f"student {student.name}: parameters by module: " +
                  ", ".join(f"{k} {v:,}" for k, v in breakdown.items() if k != "total"))
        for line in describe_kd_labels(kd_label_record, len(label_names)):
            print(f"student {student.name}: {line}")
    # what student.pt holds besides the weights; every checkpoint carries it too, so evaluation can
    # fall back to the best checkpoint when student.pt is unreadable (load_student)
    student_meta = {"student_config": dataclasses.asdict(student.model), "method": student.method,
                    "name": student.name, "label_names": label_names, "task": cfg.teachers.task,
                    "ehr_features": n_features, "ensemble_names": ensemble_names, "main_head": task.main_head}
    trainer = Trainer(student.train, out, model, task, train_loader, val_loader, label_names=label_names,
                      config_hash=fingerprint, metric_fn=metric_fn_for(student, cfg.eval.signal_labels),
                      extra_state={"student_meta": student_meta})
    result = trainer.fit(resume=resume)
    info = {}
    if trainer.is_main:
        best = load_checkpoint(result.best_checkpoint)
        save_atomic({"model": best["model"], **student_meta}, out / "student.pt")
        best_record = max((r for r in result.history if r.get(student.train.select_metric) is not None),
                          key=lambda r: r[student.train.select_metric], default={})
        info = {"name": student.name, "method": student.method, "kind": student.model.kind,
                "parameters": n_params, "parameter_breakdown": breakdown, "label_names": label_names, "fingerprint": fingerprint,
                "seed": cfg.run.seed, "world_size": world.world_size, "main_head": task.main_head,
                "checkpoint": str((out / "student.pt").resolve()), "checkpoint_sha256": sha256_file(out / "student.pt"),
                "val_auroc_macro": best_record.get("auroc_macro"), "val_auprc_macro": best_record.get("auprc_macro"),
                "best_epoch": best_record.get("epoch"), "best_metrics": best_record,
                "epochs_done": result.epochs_done, "steps": result.steps, "skipped_steps": result.skipped_steps,
                "train_samples": train_loader.plan.num_samples, "val_samples": val_loader.plan.num_samples,
                "soft_labels": str(soft_dir) if soft_dir else None,
                "soft_fingerprint": soft_index.get("fingerprint") if soft_index else None,
                "kd_labels": kd_label_record or None,
                "history": result.history}
        write_json_atomic(done, info)
        print(f"student {student.name}: best val macro AUROC {info['val_auroc_macro']} "
              f"(epoch {info['best_epoch']}) -> {out / 'student.pt'}")
    barrier()
    train_loader.close()
    val_loader.close()
    del trainer, model
    return info


def load_student(path: str | Path):
    """student.pt -> (model in eval mode, info dict). Weights only, no pickle, CRC-verified. When
    student.pt is unreadable (bit rot, truncation, a refused global), the best checkpoint of the
    run (``checkpoints/``, the weights student.pt was copied from) is used instead, with a warning
    naming both; without a usable one the original error stands."""
    path = Path(path)
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        try:
            best, best_path = CheckpointManager(path.parent / "checkpoints", mode="max").load("best")
        except (CheckpointError, FileNotFoundError, ValueError):
            raise exc from None
        if "student_meta" not in best:   # written before checkpoints carried the student's metadata
            raise exc from None
        log.warning("%s is unusable (%s): evaluating the run's best checkpoint %s instead", path, exc, best_path)
        state = {"model": best["model"], **best["student_meta"]}
    model_cfg = validate(StudentConfig, state["student_config"])
    model = build_student(model_cfg, len(state["label_names"]), ehr_features=int(state["ehr_features"]))
    weights = {k: v for k, v in state["model"].items() if not k.startswith("loss_weighting.")}
    model.load_state_dict(weights)
    model.eval()
    info = {k: state[k] for k in ("method", "name", "label_names", "task", "ensemble_names", "main_head")}
    info["model_config"] = model_cfg
    return model, info
