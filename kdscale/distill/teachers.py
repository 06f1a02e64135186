"""Teacher ensembles: training one teacher on its own modality's data.

Each teacher is a separate, addressable unit of work (``kdscale teachers --only NAME`` or
``--index I``, one SLURM array task each). A teacher trains on ALL samples of the shard set that
have its modality (``loader.require``), not only the paired ones -- the setting in which MIND's
unimodal teachers know more than a student trained on paired data (method-and-data.md §1.3).

Output per teacher, ``<teachers.out_dir>/<name>/``: ``checkpoints/`` (the engine's, resumable),
``teacher.pt`` (the best weights + model config; what the teacher pass loads), ``teacher.json``
(modality, architecture, label names, best validation AUROC, sha256 of teacher.pt, the
fingerprint of what it was trained from), ``metrics.jsonl``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from kdscale.config import to_dict, validate
from kdscale.data.ehr import MEDFUSE_EHR_FEATURES
from kdscale.data.loader import build_loader
from kdscale.data.shard_index import read_index
from kdscale.data.shards import build_shards, shards_out_dir
from kdscale.data.tario import sha256_file
from kdscale.data.transforms import subset_batch
from kdscale.distill import leakage
from kdscale.distill.losses import supervised_loss
from kdscale.distill.tasks import SIGNAL_PREFIX, check_signal_select, with_signal_metrics
from kdscale.distill.teachers_config import EnsembleConfig, TeacherConfig, TeachersConfig  # noqa: F401  (re-exported)
from kdscale.engine.checkpoint import load_checkpoint, save_atomic
from kdscale.engine.config import TrainConfig
from kdscale.engine.distributed import barrier, broadcast_object, detect_world, init_distributed
from kdscale.engine.rng import seed_everything
from kdscale.engine.trainer import Trainer, default_metrics
from kdscale.io.atomic import write_json_atomic
from kdscale.models.config import ModelConfig
from kdscale.models.registry import build_model, count_parameters

log = logging.getLogger(__name__)


def teachers_dir(cfg) -> Path:
    return Path(cfg.teachers.out_dir or Path(cfg.run.out_dir) / "teachers")


def select_named(members: list, what: str, only: str = "", index: Optional[int] = None) -> list:
    """The work units a command runs: all ``members`` (named configs), ``--index I`` (a SLURM
    array task) or ``--only a,b``; errors name what was asked and what exists."""
    names = [m.name for m in members]
    if index is not None:
        if not 0 <= index < len(members):
            raise ValueError(f"--index {index} out of range: {len(members)} {what}s ({', '.join(names)})")
        return [members[index]]
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ValueError(f"--only: unknown {what}(s) {unknown}; configured: {names}")
        return [m for m in members if m.name in wanted]
    return list(members)


def select_teachers(cfg, only: str = "", index: Optional[int] = None) -> list[TeacherConfig]:
    if not cfg.teachers.members:
        raise ValueError("teachers.members is empty: the config declares no teachers")
    return select_named(cfg.teachers.members, "teacher", only, index)


def already_trained(info_path: Path, weights_path: Path, fingerprint: str, what: str, rank: int) -> Optional[dict]:
    """The info of a model trained from exactly these inputs (same fingerprint, weights on disk),
    else None: a re-run skips it (``--force`` retrains)."""
    if not info_path.is_file() or not weights_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    if info.get("fingerprint") != fingerprint:
        return None
    if rank == 0:
        print(f"{what}: already trained (val {info.get('val_auroc_macro')}), skipping; --force retrains")
    return info


def teacher_train_config(cfg, teacher: TeacherConfig) -> TrainConfig:
    train = cfg.teachers.train
    optimizer = train.optimizer if teacher.lr is None else dataclasses.replace(train.optimizer, lr=teacher.lr)
    select = train.select_metric
    if select.startswith(SIGNAL_PREFIX) and teacher.data == "radiology":
        select = "auroc_macro"   # eval.signal_labels are the task's labels, not the radiology task's
    return dataclasses.replace(train, epochs=teacher.epochs or train.epochs, optimizer=optimizer,
                               select_metric=select)


def teacher_fingerprint(cfg, teacher: TeacherConfig, data_index: dict) -> str:
    """What a trained teacher depends on: its config, the training config, the shard set, and
    the checkpoint it starts from."""
    payload = {"teacher": to_dict(teacher), "train": to_dict(teacher_train_config(cfg, teacher)),
               "loader": to_dict(cfg.loader), "data_config_hash": data_index.get("config_hash"),
               "shards": [s["sha256"] for s in data_index["shards"]]}
    if payload["train"]["select_metric"].startswith(SIGNAL_PREFIX):   # the labels it selects on
        payload["signal_labels"] = list(cfg.eval.signal_labels)
    if teacher.init_from:
        payload["init_from_sha256"] = sha256_file(init_checkpoint(cfg, teacher))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def init_checkpoint(cfg, teacher: TeacherConfig) -> Path:
    """The file ``teacher.init_from`` names: teachers/<name> -> that teacher's teacher.pt."""
    if teacher.init_from.startswith("teachers/"):
        path = teachers_dir(cfg) / teacher.init_from.split("/", 1)[1] / "teacher.pt"
        hint = f" (train it first: `kdscale teachers --only {teacher.init_from.split('/', 1)[1]}`)"
    else:
        path, hint = Path(teacher.init_from), ""
    if not path.is_file():
        raise FileNotFoundError(f"teacher {teacher.name}: init_from {teacher.init_from!r}: {path} not found{hint}")
    return path


def radiology_view(cfg):
    """``cfg`` reading the radiology task (every film, CheXpert labels) of the same MIMIC tree,
    with its own shard folder next to the run's: what data radiology teachers train on."""
    source = cfg.data.source
    section = getattr(cfg.data, source, None)
    if source not in ("mimic", "demo") or (source == "demo" and section.flavor != "mimic"):
        raise ValueError(f"a teacher with data radiology needs a MIMIC source (data.source mimic, or demo with "
                         f"flavor mimic); data.source is {source!r}")

    data = dataclasses.replace(cfg.data, **{source: dataclasses.replace(section, task="radiology")})
    shards = dataclasses.replace(cfg.shards, out_dir=str(shards_out_dir(cfg)) + "-radiology")
    return dataclasses.replace(cfg, data=data, shards=shards)


# ---------------------------------------------------------------------------------------------
# The unimodal training task
# ---------------------------------------------------------------------------------------------

class UnimodalTask:
    """Loss and predictions of one unimodal model on the samples that have its modality."""

    main_head = "out"

    def __init__(self, modality: str, task: str = "multilabel"):
        self.modality, self.task = modality, task

    def loss(self, model, batch: dict):
        logits = model(batch)
        return supervised_loss(logits.float(), batch["labels"], self.task, mask=batch["present"][self.modality]), {}

    def predict(self, model, batch: dict) -> dict:
        logits = model(batch).float()
        probs = torch.softmax(logits, -1) if self.task == "multiclass" else torch.sigmoid(logits)
        return {self.main_head: (probs, batch["present"][self.modality])}


# ---------------------------------------------------------------------------------------------
# Training one teacher
# ---------------------------------------------------------------------------------------------

def _loader_config(cfg, teacher: TeacherConfig, workers: Optional[int] = None):
    modality = teacher.model.modality
    return dataclasses.replace(cfg.loader, modalities=[modality], require=[modality],
                               batch_size=teacher.batch_size or cfg.loader.batch_size,
                               num_workers=cfg.loader.num_workers if workers is None else workers)


def fit_preprocessing(model, shard_dir: Path, loader_cfg) -> None:
    """Learn a model's preprocessing (tokenizer, tabular encoding) from the TRAIN split only, on
    rank 0, and share the fitted state with every rank (so all ranks tokenize alike)."""
    world = detect_world()
    state = None
    if world.rank == 0:
        eval_cfg = dataclasses.replace(loader_cfg, drop_last=False)
        loader = build_loader(shard_dir, "train", eval_cfg, train=False, rank=0, world_size=1)
        model.fit(_valid_rows(loader))
        state = model.state_dict() if world.distributed else None
    if world.distributed:
        if not dist.is_initialized():
            init_distributed(world)
        state = broadcast_object(state)
        if world.rank != 0:
            model.load_state_dict(state)


def _valid_rows(loader):
    """Eval loaders pad the last slots with repeats flagged valid=False: fit on real rows only."""
    for batch in loader:
        valid = batch["valid"]
        if bool(valid.all()):
            yield batch
        elif bool(valid.any()):
            yield subset_batch(batch, valid.nonzero().squeeze(1).to(torch.long))


def leakage_check(cfg, teacher: TeacherConfig, shard_dir: Path, loader_cfg, label_names: list, history: list) -> list:
    """Possible label leakage of a trained teacher (kdscale.distill.leakage): for a privileged
    input (tabular, report) the columns / tokens that determine a label on the TRAINING split,
    and for every teacher a validation AUROC >= 0.99. Each finding is logged as a warning."""
    modality = teacher.model.modality
    findings = []
    if modality in ("tabular", "report"):
        loader = build_loader(shard_dir, "train", dataclasses.replace(loader_cfg, drop_last=False, num_workers=0),
                              train=False, rank=0, world_size=1)
        values, labels = [], []
        for batch in _valid_rows(loader):
            values += list(batch[modality])
            labels.append(batch["labels"].numpy())
        if values:
            y = np.concatenate(labels)
            check = leakage.tabular_leaks if modality == "tabular" else leakage.text_leaks
            findings += check(values, y, label_names, cfg.teachers.task)
    findings += leakage.score_leaks(history, label_names)
    for finding in findings:
        log.warning("teacher %s: possible label leakage: %s", teacher.name, finding["message"])
    return findings


def train_teacher(cfg, teacher: TeacherConfig, *, resume: Optional[str] = None, force: bool = False) -> dict:
    world = detect_world()
    data_cfg = cfg
    if teacher.data == "radiology":
        data_cfg = radiology_view(cfg)
        built = build_shards(data_cfg, workers=1)   # a no-op once complete (same data config)
        if not built.get("complete", True):
            raise RuntimeError(f"radiology shards in {shards_out_dir(data_cfg)} are incomplete: {built}")
    shard_dir = shards_out_dir(data_cfg)
    index = read_index(shard_dir, "train")
    label_names, n_features = index["label_names"], int((index.get("ehr") or {}).get("num_features") or 0)
    out = teachers_dir(cfg) / teacher.name
    fingerprint = teacher_fingerprint(cfg, teacher, index)
    done = out / "teacher.json"
    info = None if force or resume else already_trained(done, out / "teacher.pt", fingerprint,
                                                          f"teacher {teacher.name}", world.rank)
    if info is not None:
        return info
    seed_everything(cfg.run.seed, world.rank)
    model_cfg = teacher.model
    if teacher.init_from:   # the encoder only: load_encoder_weights takes a teacher.pt's encoder.backbone.*
        model_cfg = dataclasses.replace(teacher.model, pretrained_path=str(init_checkpoint(cfg, teacher)))
    model = build_model(model_cfg, len(label_names), ehr_features=n_features or MEDFUSE_EHR_FEATURES)
    loader_cfg = _loader_config(cfg, teacher)
    if getattr(model, "needs_fit", False):
        fit_preprocessing(model, shard_dir, loader_cfg)
    train_loader = build_loader(shard_dir, "train", loader_cfg, train=True)
    val_loader = build_loader(shard_dir, "val", dataclasses.replace(loader_cfg, drop_last=False), train=False)
    n_params = count_parameters(model)
    if world.rank == 0:
        print(f"teacher {teacher.name}: {teacher.model.modality} {teacher.model.arch}, {n_params:,} parameters, "
              f"{train_loader.plan.num_samples} train / {val_loader.plan.num_samples} val samples with "
              f"{teacher.model.modality} ({teacher.data}: {len(label_names)} labels)"
              + (f", encoder from {teacher.init_from}" if teacher.init_from else ""))
    task = UnimodalTask(teacher.model.modality, cfg.teachers.task)
    train_cfg = teacher_train_config(cfg, teacher)
    # as students: a signal/ select_metric is the macro over eval.signal_labels
    check_signal_select(train_cfg.select_metric, cfg.eval.signal_labels, label_names, "teachers.train.select_metric")
    signal = cfg.eval.signal_labels if train_cfg.select_metric.startswith(SIGNAL_PREFIX) else []
    trainer = Trainer(train_cfg, out, model, task, train_loader, val_loader, label_names=label_names,
                      config_hash=fingerprint, metric_fn=with_signal_metrics(default_metrics, signal))
    result = trainer.fit(resume=resume)
    info = {}
    if trainer.is_main:
        best = load_checkpoint(result.best_checkpoint)
        save_atomic({"model": best["model"], "model_config": dataclasses.asdict(teacher.model),
                     "label_names": label_names, "name": teacher.name}, out / "teacher.pt")
        best_record = max((r for r in result.history if r.get(train_cfg.select_metric) is not None),
                          key=lambda r: r[train_cfg.select_metric], default={})
        info = {"name": teacher.name, "modality": teacher.model.modality, "arch": teacher.model.arch,
                "data": teacher.data, "init_from": teacher.init_from,
                "parameters": n_params, "label_names": label_names, "fingerprint": fingerprint,
                "checkpoint": str((out / "teacher.pt").resolve()), "checkpoint_sha256": sha256_file(out / "teacher.pt"),
                "val_auroc_macro": best_record.get("auroc_macro"), "val_auprc_macro": best_record.get("auprc_macro"),
                "best_epoch": best_record.get("epoch"), "epochs_done": result.epochs_done,
                "skipped_steps": result.skipped_steps, "train_samples": train_loader.plan.num_samples,
                "val_samples": val_loader.plan.num_samples, "history": result.history}
        leaks = leakage_check(cfg, teacher, shard_dir, loader_cfg, label_names, result.history)
        info["leakage"] = {"warnings": [f["message"] for f in leaks], "findings": leaks}
        write_json_atomic(done, info)
        print(f"teacher {teacher.name}: best val macro AUROC {info['val_auroc_macro']} "
              f"(epoch {info['best_epoch']}) -> {out / 'teacher.pt'}")
    barrier()
    del trainer, model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return info


def load_teacher(path: str | Path):
    """teacher.pt -> (model in eval mode, info dict). Weights only, no pickle."""
    state = load_checkpoint(path)
    model_cfg = validate(ModelConfig, state["model_config"])
    model = build_model(model_cfg, len(state["label_names"]), ehr_features=_ehr_features(state["model"]))
    model.load_state_dict(state["model"])
    model.eval()
    return model, {"name": state["name"], "modality": model_cfg.modality, "label_names": state["label_names"]}


def _ehr_features(state_dict: dict) -> int:
    """The EHR input width from the weights (LSTM weight_ih / transformer proj), else MedFuse's."""
    for key, value in state_dict.items():
        if key.endswith(("layers.0.weight_ih_l0", "proj.weight")) and hasattr(value, "shape"):
            return int(value.shape[1])
    return MEDFUSE_EHR_FEATURES
