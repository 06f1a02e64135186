"""Teacher ensembles: configuration, and training one teacher on its own modality's data.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from kdscale.engine.config import TrainConfig
from kdscale.models.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class TeacherConfig:
    name: str
    model: ModelConfig
    epochs: Optional[int] = None          # overrides teachers.train.epochs
    lr: Optional[float] = None            # overrides teachers.train.optimizer.lr
    batch_size: Optional[int] = None      # overrides loader.batch_size
    # What the teacher trains on: "task" = the run's data shards (its task's labels); "radiology" =
    # the CheXpert labels of EVERY film of the same MIMIC tree (MedFuse's CXR pretraining,
    # method-and-data.md §3.10), read into a second shard set <shards.out_dir>-radiology by the
    # teachers stage. A radiology teacher is a pretraining step: it is in no ensemble and the
    # teacher pass skips it.
    data: Literal["task", "radiology"] = "task"
    # Start from another teacher's encoder ("teachers/<name>": an earlier member of this run) or a
    # local checkpoint path (teacher.pt or a state dict); the head is new (label sets may differ).
    init_from: str = ""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"teacher name {self.name!r} must be non-empty letters, digits, '_' or '-'")
        if self.data == "radiology" and self.model.modality != "image":
            raise ValueError(f"teacher {self.name!r}: data radiology trains on films; model.modality must be "
                             f"image, got {self.model.modality!r}")


@dataclass
class EnsembleConfig:
    name: str
    members: list[str]
    rule: Literal["uniform", "fixed", "val_auroc"] = "uniform"
    weights: dict[str, float] = field(default_factory=dict)   # rule fixed
    space: Literal["logit", "prob"] = "prob"                   # where the weighted average is taken


@dataclass
class TeachersConfig:
    out_dir: str = ""                     # default: <run.out_dir>/teachers
    task: Literal["multilabel", "multiclass"] = "multilabel"
    members: list[TeacherConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    ensembles: list[EnsembleConfig] = field(default_factory=list)   # default: one per modality

    def __post_init__(self) -> None:
        names = [t.name for t in self.members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teachers.members: duplicate names {dupes}")
        for ens in self.ensembles:
            unknown = [m for m in ens.members if m not in names]
            if unknown:
                raise ValueError(f"teachers.ensembles {ens.name!r}: unknown members {unknown}; teachers: {names}")
            if ens.rule == "fixed" and sorted(ens.weights) != sorted(ens.members):
                raise ValueError(f"teachers.ensembles {ens.name!r}: rule fixed needs one weight per member")
            pretrain = [m for m in ens.members if m in self._pretrain_names()]
            if pretrain:
                raise ValueError(f"teachers.ensembles {ens.name!r}: {pretrain} train on data radiology (another "
                                 f"label set); only data task teachers can be ensembled")
        for i, t in enumerate(self.members):
            if t.init_from.startswith("teachers/"):
                source = t.init_from.split("/", 1)[1]
                if source not in names[:i]:
                    raise ValueError(f"teachers.members[{i}] ({t.name}).init_from {t.init_from!r}: no earlier "
                                     f"member named {source!r} (earlier: {names[:i]})")
                other = self.members[names.index(source)]
                if (other.model.modality, other.model.arch) != (t.model.modality, t.model.arch):
                    raise ValueError(f"teachers.members[{i}] ({t.name}).init_from {t.init_from!r}: that teacher is "
                                     f"{other.model.modality}/{other.model.arch}, this one "
                                     f"{t.model.modality}/{t.model.arch}")

    def _pretrain_names(self) -> set:
        return {t.name for t in self.members if t.data != "task"}

    def task_members(self) -> list[TeacherConfig]:
        """The teachers of the run's task: the ones the teacher pass runs and ensembles combine."""
        return [t for t in self.members if t.data == "task"]

    def resolved_ensembles(self) -> list[EnsembleConfig]:
        """The configured ensembles, or one uniform one per modality, named after the modality."""
        if self.ensembles:
            return list(self.ensembles)
        by_modality: dict[str, list[str]] = {}
        for t in self.task_members():
            by_modality.setdefault(t.model.modality, []).append(t.name)
        return [EnsembleConfig(name=m, members=names) for m, names in by_modality.items()]


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
    if select.startswith("signal/") and teacher.data == "radiology":
        select = "auroc_macro"   # eval.signal_labels are the task's labels, not the radiology task's
    return dataclasses.replace(train, epochs=teacher.epochs or train.epochs, optimizer=optimizer,
                               select_metric=select)


def teacher_fingerprint(cfg, teacher: TeacherConfig, data_index: dict) -> str:
    """What a trained teacher depends on: its config, the training config, the shard set, and
    the checkpoint it starts from."""
    from kdscale.config import to_dict
    from kdscale.data.tario import sha256_file

    payload = {"teacher": to_dict(teacher), "train": to_dict(teacher_train_config(cfg, teacher)),
               "loader": to_dict(cfg.loader), "data_config_hash": data_index.get("config_hash"),
               "shards": [s["sha256"] for s in data_index["shards"]]}
    if payload["train"]["select_metric"].startswith("signal/"):   # the labels it selects on
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
    from kdscale.data.shards import shards_out_dir

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
        from kdscale.distill.losses import supervised_loss

        logits = model(batch)
        return supervised_loss(logits.float(), batch["labels"], self.task, mask=batch["present"][self.modality]), {}

    def predict(self, model, batch: dict) -> dict:
        import torch

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
    from kdscale.data.loader import build_loader
    from kdscale.engine.distributed import broadcast_object, detect_world

    world = detect_world()
    state = None
    if world.rank == 0:
        eval_cfg = dataclasses.replace(loader_cfg, drop_last=False)
        loader = build_loader(shard_dir, "train", eval_cfg, train=False, rank=0, world_size=1)
        model.fit(_valid_rows(loader))
        state = model.state_dict() if world.distributed else None
    if world.distributed:
        import torch.distributed as dist
        if not dist.is_initialized():
            from kdscale.engine.distributed import init_distributed
            init_distributed(world)
        state = broadcast_object(state)
        if world.rank != 0:
            model.load_state_dict(state)


def _valid_rows(loader):
    """Eval loaders pad the last slots with repeats flagged valid=False: fit on real rows only."""
    import torch

    from kdscale.distill.teacher_pass import subset_batch

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
    import numpy as np

    from kdscale.data.loader import build_loader
    from kdscale.distill import leakage

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
    import torch

    from kdscale.data.loader import build_loader
    from kdscale.data.shard_index import read_index
    from kdscale.data.shards import shards_out_dir, write_json_atomic
    from kdscale.engine.checkpoint import load_checkpoint, save_atomic
    from kdscale.engine.distributed import barrier, detect_world
    from kdscale.engine.rng import seed_everything
    from kdscale.engine.trainer import Trainer
    from kdscale.models.registry import build_model, count_parameters

    world = detect_world()
    data_cfg = cfg
    if teacher.data == "radiology":
        from kdscale.data.shards import build_shards

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
    model = build_model(model_cfg, len(label_names), ehr_features=n_features or 76)
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
    signal = []
    if train_cfg.select_metric.startswith("signal/"):   # as students: the macro over eval.signal_labels
        from kdscale.distill.student_training import metric_fn_for_labels

        signal = list(cfg.eval.signal_labels)
        if not signal:
            raise ValueError(f"teachers.train.select_metric {train_cfg.select_metric!r} needs eval.signal_labels")
    trainer = Trainer(train_cfg, out, model, task, train_loader, val_loader, label_names=label_names,
                      config_hash=fingerprint, **({"metric_fn": metric_fn_for_labels(signal)} if signal else {}))
    result = trainer.fit(resume=resume)
    info = {}
    if trainer.is_main:
        best = load_checkpoint(result.best_checkpoint)
        save_atomic({"model": best["model"], "model_config": dataclasses.asdict(teacher.model),
                     "label_names": label_names, "name": teacher.name}, out / "teacher.pt")
        from kdscale.data.tario import sha256_file
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
    from kdscale.config import validate
    from kdscale.engine.checkpoint import load_checkpoint
    from kdscale.models.registry import build_model

    state = load_checkpoint(path)
    model_cfg = validate(ModelConfig, state["model_config"])
    model = build_model(model_cfg, len(state["label_names"]), ehr_features=_ehr_features(state["model"]))
    model.load_state_dict(state["model"])
    model.eval()
    return model, {"name": state["name"], "modality": model_cfg.modality, "label_names": state["label_names"]}


def _ehr_features(state_dict: dict) -> int:
    """The EHR input width from the weights (LSTM weight_ih / transformer proj), else 76."""
    for key, value in state_dict.items():
        if key.endswith(("layers.0.weight_ih_l0", "proj.weight")) and hasattr(value, "shape"):
            return int(value.shape[1])
    return 76
